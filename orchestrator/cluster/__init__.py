"""Runs on Ray: driver.py connects to a Ray cluster (or starts a private one on loopback) and
builds the Ray Train trainer of a run; worker.py is the run's rank inside a Ray Train worker.
May import models, parallel and run; nothing here knows Tune or MLflow."""
