"""`python -m orchestrator.summary`, as the docs write it: runs `orchestrator.commands.summary`."""
import sys

from orchestrator.commands.summary import main

if __name__ == "__main__":
    sys.exit(main())
