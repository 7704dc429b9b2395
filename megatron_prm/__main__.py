import sys

from megatron_prm.cli import main

# The guard matters: Megatron's checkpoint writer starts helper processes with the "spawn" method,
# which re-imports the main module.
if __name__ == "__main__":
    sys.exit(main())
