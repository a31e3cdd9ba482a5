"""Analysis of trained runs: n0.py (matched-pair statistics: n0 and its interval), report.py (the
report's tables and figures), lesion.py (deleting blocks or functions at test time).
May import models and orchestrator.run; nothing here knows Ray or MLflow."""
