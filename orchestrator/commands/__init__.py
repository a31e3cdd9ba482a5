"""The commands: train.py, sweep.py, report.py, lesion.py, summary.py, each its flags and a call
into the layers below (`multires-<name>` once installed, or `python -m orchestrator.<name>`);
cli.py is what they share (the error convention, logging, the common flags).
May import every layer; cli.py only the base, so that `--help` answers before torch loads."""
