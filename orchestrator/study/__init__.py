"""Studies: the study file's schema (config.py, settings.py; pair designs come from
analysis/pairs.py), the searchers (searchers.py, samplers.py, search_state.py, n0_search.py: the
n0 policy of analysis/n0_policy.py as a Tune searcher), one trial (trials.py), MLflow tracking (tracking.py,
mlflow_client.py), running a study (runner.py, placement.py: where its trials fit) and what it shows
(console.py while it runs, outputs.py).
May import everything below it: models, parallel, run, cluster, analysis."""
