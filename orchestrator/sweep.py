"""`python -m orchestrator.sweep`, as the docs write it: runs `orchestrator.commands.sweep`."""
import sys

if __name__ == "__main__":
    from orchestrator.commands.sweep import main

    sys.exit(main())
