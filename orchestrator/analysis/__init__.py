"""Analysis of trained runs: pairs.py (matched pairs: the k=1 net and the wider net of equal
parameters, and pair designs), n0.py (matched-pair statistics: n0 and its interval),
n0_shape.py (a smooth single crossing fitted across pairs, checked by a lack-of-fit test),
n0_policy.py (which pair and seed to train next to locate n0, and when to stop: pure, no Ray),
report_builder.py (the report's tables and figures), lesion_study.py (deleting blocks or functions at test
time).
May import models and orchestrator.run; nothing here knows Ray or MLflow."""
