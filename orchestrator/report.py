"""`python -m orchestrator.report`, as the docs write it: runs `orchestrator.commands.report`."""
import sys

from orchestrator.commands.report import main

if __name__ == "__main__":
    sys.exit(main())
