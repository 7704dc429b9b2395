import sys

# The import stays under the guard: Megatron's checkpoint writer starts a helper process with the "spawn"
# method, which imports the main module again, and that helper needs neither torch nor Megatron-Core
# (importing them would add seconds to every process's first save).
if __name__ == "__main__":
    from megatron_prm.cli import main

    sys.exit(main())
