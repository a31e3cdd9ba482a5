"""Studies: the study file's schema (config.py, settings.py, pairs.py), the searchers
(searchers.py, n0_search.py), one trial (trials.py), MLflow tracking (tracking.py,
mlflow_client.py), running a study (sweep.py) and what it shows (summary.py).
May import everything below it: models, parallel, run, cluster, analysis."""
