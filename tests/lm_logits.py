"""Full-vocabulary logits of Megatron checkpoints under a parallel layout; the conversion tests run it.

``python tests/lm_logits.py OUT TP PP [--ep EP] CKPT [CKPT ...]`` (under torchrun for more than one
process; EP: the expert-parallel size of MoE models, drawn from the data-parallel ranks): loads each
checkpoint into the local-spec model of that layout, runs a fixed token batch through Megatron's
forward-only schedule and saves ``{ckpt: logits [batch, seq, vocab]}`` (the vocabulary unpadded and
gathered over tensor-parallel ranks) to OUT with torch.save.
"""

import os
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_prm.checkpoint import MODEL_CONFIG_NAME, load_model_weights
from megatron_prm.layout import ParallelLayout
from megatron_prm.model.architecture import Architecture, read_hf_config
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.runtime import init_runtime, shutdown

BATCH, SEQ = 2, 24


def fixed_tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1234))


def logits_of(checkpoint: Path, layout: ParallelLayout) -> torch.Tensor | None:
    config_path = checkpoint / MODEL_CONFIG_NAME
    arch = Architecture.from_hf_config(read_hf_config(config_path), str(config_path))
    chunks = build_model_chunks(arch, (0, 1), SEQ, ModelBuildOptions(layout=layout, use_cpu_initialization=True))
    load_model_weights(chunks, checkpoint, arch)
    tokens = fixed_tokens(arch.vocab_size)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, positions)

        def collect(logits):
            full = gather_from_tensor_model_parallel_region(logits)  # [s, b, padded vocab]
            return torch.zeros(()), torch.tensor(1), {"logits": full.transpose(0, 1)[..., : arch.vocab_size]}

        return output, collect

    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=chunks, num_microbatches=1,
            seq_length=SEQ, micro_batch_size=BATCH, forward_only=True)
    return reports[0]["logits"].clone() if parallel_state.is_pipeline_last_stage() else None


if __name__ == "__main__":
    out, tp, pp, checkpoints = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    ep = 1
    if checkpoints[0] == "--ep":
        ep, checkpoints = int(checkpoints[1]), checkpoints[2:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=world // (tp * pp),
                            expert_parallel_size=ep)
    init_runtime("cpu", 0, layout)
    results = {c: logits_of(Path(c), layout) for c in checkpoints}
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(results, out)
    shutdown()
