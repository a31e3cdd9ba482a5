"""Studies: the study file's schema (config.py, settings.py; pair designs come from
analysis/pairs.py), the searchers (searchers.py, samplers.py, search_state.py, n0_search.py: the
n0 policy of analysis/n0_policy.py as a Tune searcher), its trials (trials.py: how many; trainable.py:
what runs in one), MLflow tracking (tracking.py, mlflow_client.py), running a study (runner.py;
folder.py: its results folder; placement.py: where its trials fit) and what it shows (preview.py
before it runs, console.py while it runs, outputs.py at its end).
May import everything below it: models, parallel, run, cluster, analysis."""
