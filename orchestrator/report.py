"""`python -m orchestrator.report`, as the docs write it: runs `orchestrator.commands.report`."""
import sys

if __name__ == "__main__":
    from orchestrator.commands.report import main

    sys.exit(main())
