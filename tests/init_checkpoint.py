"""Write the randomly initialised model of a run config as a checkpoint (one process, CPU).

``python tests/init_checkpoint.py CONFIG OUTPUT_DIR``: the parallel tests start every layout from this
one checkpoint, so that they compare the same model.
"""

import sys
from pathlib import Path

from megatron_prm.checkpoint import save_model_checkpoint
from megatron_prm.config import load_config
from megatron_prm.data.pipeline import tokenize_job
from megatron_prm.data.preprocess import RecordTokenizer
from megatron_prm.layout import ParallelLayout
from megatron_prm.model.architecture import resolve_architecture
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.runtime import init_runtime, shutdown

if __name__ == "__main__":
    config = load_config(sys.argv[1], ["--model_name_or_path", "null"])
    tokenizer = RecordTokenizer(tokenize_job(config, config.data.train_dataset_path))
    arch = resolve_architecture(config.model, tokenizer.tokenizer.vocab_size, config.data.max_seq_len)
    init_runtime("cpu", config.training.seed, ParallelLayout())
    chunks = build_model_chunks(arch, tokenizer.special.reward_ids, config.data.max_seq_len,
                                ModelBuildOptions(use_cpu_initialization=True))
    save_model_checkpoint(chunks, Path(sys.argv[2]), 0, config, arch)
    shutdown()
