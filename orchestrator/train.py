"""`python -m orchestrator.train`, as the docs write it: runs `orchestrator.commands.train`."""
import sys

if __name__ == "__main__":
    from orchestrator.commands.train import main

    sys.exit(main())
