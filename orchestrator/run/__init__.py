"""One training run, in one process or as one rank of a mesh: config.py (the run schema),
data.py (the dataset registry and batches), images.py (image folders and ImageNet: checks,
decoding workers, the ImageNet recipe's augmentation), step.py (one training step), loop.py (epochs,
evaluation, reports), checkpoint.py, session.py (where a single run's results go).
May import models and orchestrator.parallel; nothing here knows Ray, Tune or MLflow."""
