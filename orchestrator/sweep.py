"""`python -m orchestrator.sweep`, as the docs write it: runs `orchestrator.commands.sweep`."""
import sys

from orchestrator.commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
