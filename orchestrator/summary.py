"""`python -m orchestrator.summary`, as the docs write it: runs `orchestrator.commands.summary`."""
import sys

if __name__ == "__main__":
    from orchestrator.commands.summary import main

    sys.exit(main())
