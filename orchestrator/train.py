"""`python -m orchestrator.train`, as the docs write it: runs `orchestrator.commands.train`."""
import sys

from orchestrator.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
