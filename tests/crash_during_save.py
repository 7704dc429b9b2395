"""``python tests/crash_during_save.py CRASH_STEP megatron-prm-args...``: run the trainer and kill its process
group with SIGKILL in the middle of writing the checkpoint of step CRASH_STEP (some files written, none
published). Start it in a session of its own."""

import os
import signal
import sys
from pathlib import Path

from megatron.core import dist_checkpointing

from megatron_prm import checkpoint, checkpoint_io
from megatron_prm.cli import main

if __name__ == "__main__":
    crash_step = int(sys.argv[1])
    real_save = dist_checkpointing.save

    def save_then_die(sharded, directory, *args, **kwargs):
        if Path(directory).name == checkpoint.checkpoint_name(crash_step) + ".tmp":
            (Path(directory) / "__0_0.distcp").write_bytes(b"half a shard")
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the whole run, checkpoint helper processes too
        return real_save(sharded, directory, *args, **kwargs)

    checkpoint_io.dist_checkpointing.save = save_then_die
    sys.exit(main(sys.argv[2:]))
