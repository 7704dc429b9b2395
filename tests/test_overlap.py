"""The communication-overlap options reach Megatron-Core's configs (DDP, optimizer hooks, TransformerConfig);
training with them is compared with training without in tests/test_parallel.py (dp2 ... overlap cases)."""

import pytest

from megatron_prm.config import ConfigError, build_config
from megatron_prm.layout import ParallelLayout
from megatron_prm.model.architecture import Architecture
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks, transformer_config
from megatron_prm.training_state import CommunicationOverlap, build_training_state, parameters_gathered

ARCH = Architecture(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=256, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, initializer_range=0.02,
)


def test_overlap_options_are_checked_with_the_settings_they_need():
    with pytest.raises(ConfigError, match="overlap_param_gather needs sharding: stage1 .* and overlap_grad_reduce"):
        build_config({"overlap_param_gather": True, "overlap_grad_reduce": True})
    with pytest.raises(ConfigError, match="overlap_param_gather needs"):
        build_config({"overlap_param_gather": True, "sharding": "stage1"})
    with pytest.raises(ConfigError, match="tp_comm_overlap needs tensor_parallel_degree > 1 and sequence_parallel"):
        build_config({"tp_comm_overlap": True, "tensor_parallel_degree": 2})
    config = build_config({"overlap_grad_reduce": True, "overlap_param_gather": True, "sharding": "stage1"})
    assert CommunicationOverlap.from_config(config.parallel) == CommunicationOverlap(grad_reduce=True, param_gather=True)


def test_tp_comm_overlap_is_refused_without_transformer_engine_and_reaches_the_transformer_config():
    config = build_config({"tp_comm_overlap": True, "tensor_parallel_degree": 2, "sequence_parallel": True,
                           "max_seq_len": 512, "max_prompt_len": 256, "per_device_train_batch_size": 2})
    layout = ParallelLayout(2, 1, 1, 1, sequence_parallel=True)
    with pytest.raises(ConfigError) as refused:
        ModelBuildOptions.from_config(config, layout, use_transformer_engine=False, use_cpu_initialization=True)
    assert str(refused.value) == "tp_comm_overlap needs Transformer Engine on a GPU; it is not available here"
    # With TE present (TE itself cannot be installed here): userbuffers sized for max_seq_len x micro batch
    # tokens, and Megatron's TransformerConfig told to overlap.
    with_te = ModelBuildOptions.from_config(config, layout, use_transformer_engine=True, use_cpu_initialization=True)
    assert with_te.tp_comm_overlap_tokens == 512 * 2
    assert transformer_config(ARCH, ModelBuildOptions(layout=layout, tp_comm_overlap_tokens=1024)).tp_comm_overlap
    assert not transformer_config(ARCH, ModelBuildOptions(layout=layout)).tp_comm_overlap


@pytest.fixture()
def runtime():
    from megatron_prm.runtime import init_runtime, shutdown

    yield init_runtime("cpu", seed=0)
    shutdown()


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_overlap_reaches_megatron_ddp_and_the_schedule_hooks(runtime, distributed_optimizer):
    config = build_config({"max_steps": 2, "bf16": False})
    overlap = CommunicationOverlap(grad_reduce=True, param_gather=distributed_optimizer)
    chunks = build_model_chunks(ARCH, (7, 200), 64, ModelBuildOptions(use_cpu_initialization=True))
    state = build_training_state(chunks, config.training, 2, distributed_optimizer, overlap)
    ddp = state.model[0]
    assert ddp.ddp_config.overlap_grad_reduce and ddp.ddp_config.overlap_param_gather == distributed_optimizer
    model_config = chunks[0].config
    assert model_config.no_sync_func == ddp.no_sync and model_config.grad_sync_func == ddp.start_grad_sync
    assert ddp.use_forward_hook == distributed_optimizer
    # Evaluation and saving run with the parameter-gather hooks removed (parameters gathered first).
    with parameters_gathered(state.model):
        assert not ddp.remove_forward_pre_hook_handles
    assert bool(ddp.remove_forward_pre_hook_handles) == distributed_optimizer

    plain = build_training_state(build_model_chunks(ARCH, (7, 200), 64, ModelBuildOptions(use_cpu_initialization=True)),
                                 config.training, 2)
    assert not plain.model[0].ddp_config.overlap_grad_reduce and plain.model[0].config.no_sync_func is None


def test_data_parallel_training_with_overlap_equals_without(tmp_path):
    """Two gloo ranks (tests/overlap_dp2.py): overlapped gradient reduction and parameter gathering give
    the losses, grad norms and parameters of the same training without overlap; with overlap_param_gather
    the ranks' parameters differ after a step until they are gathered (what evaluation and saving do)."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    from conftest import REPO, free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(REPO / "tests" / "overlap_dp2.py"), str(tmp_path / "dp2")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"dp2.rank{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        for plain, overlapped in (("ddp", "ddp_overlap"), ("distributed_optimizer", "distributed_optimizer_overlap")):
            assert report[overlapped]["loss"] == pytest.approx(report[plain]["loss"], rel=1e-6, abs=1e-9)
            assert report[overlapped]["grad_norm"] == pytest.approx(report[plain]["grad_norm"], rel=1e-6)
            np.testing.assert_allclose(report[overlapped]["parameters"], report[plain]["parameters"], rtol=0, atol=1e-6)
        assert report["ddp"]["largest_update"] > 1e-3  # it trains
        assert report["distributed_optimizer_overlap"]["ranks_differ_before_gather"]
        assert not any(report[way]["ranks_differ_after_gather"] for way in report)
    assert reports[0]["ddp"]["loss"] == reports[1]["ddp"]["loss"]  # the step's loss is reduced over both ranks


def test_tp_comm_overlap_pads_every_micro_batch_to_max_seq_len():
    """TE's userbuffers have one shape: with tp_comm_overlap every micro batch, packed or padded, is
    max_seq_len tokens long, and a max_seq_len that the tensor-parallel size does not divide is refused."""
    import numpy as np

    from megatron_prm.data.batching import Collator
    from megatron_prm.data.packing import PackingOptions
    from megatron_prm.data.samples import Sample
    from megatron_prm.layout import resolve_layout

    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(10, 250, size=n).astype(np.int32), np.array([n - 1], dtype=np.int32),
                      np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.int32), i) for i, n in enumerate((9, 14, 5))]
    for packing in (None, PackingOptions(64, row_multiple=2)):
        batches = Collator(0, 2, packing=packing, fixed_length=64)([samples[:2], samples[2:]])
        assert [b.tokens.shape[1] for b in batches] == [64, 64]
        if packing is not None:
            assert [b.cu_seqlens_padded[-1].item() for b in batches] == [64, 64]
    config = build_config({"tp_comm_overlap": True, "tensor_parallel_degree": 4, "sequence_parallel": True,
                           "max_seq_len": 510, "max_prompt_len": 256})
    with pytest.raises(ConfigError, match="max_seq_len 510, which must then be divisible by tensor_parallel_degree 4"):
        resolve_layout(config, 4, ARCH)
