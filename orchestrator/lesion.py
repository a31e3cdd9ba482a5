"""`python -m orchestrator.lesion`, as the docs write it: runs `orchestrator.commands.lesion`."""
import sys

from orchestrator.commands.lesion import main

if __name__ == "__main__":
    sys.exit(main())
