"""`python -m orchestrator.lesion`, as the docs write it: runs `orchestrator.commands.lesion`."""
import sys

if __name__ == "__main__":
    from orchestrator.commands.lesion import main

    sys.exit(main())
