"""Context parallelism: the load-balanced split, the attention without Transformer Engine, and the layout.

The training runs under CP x TP, CP x PP and CP x DP are in tests/test_parallel.py, the exact resume of
a packed CP2 run in tests/test_checkpoint.py.
"""


import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, run_script
from megatron_prm.config import ConfigError, load_config
from megatron_prm.context_chunks import chunk_indices, gathered_order, rank_positions
from megatron_prm.data.batching import collate_packed
from megatron_prm.data.context_split import split_for_context_parallel
from megatron_prm.data.packing import PackingOptions
from megatron_prm.data.samples import Sample
from megatron_prm.layout import resolve_layout
from megatron_prm.model.architecture import Architecture


def test_each_rank_holds_chunks_r_and_2cp_minus_1_minus_r():
    assert chunk_indices(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert chunk_indices(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # A packed row is cut sample by sample; all ranks together hold every position once.
    offsets = [0, 8, 24, 32]
    shares = [rank_positions(32, offsets, rank, 4) for rank in range(4)]
    assert shares[0].tolist() == [0, 7, 8, 9, 22, 23, 24, 31]
    assert sorted(np.concatenate(shares).tolist()) == list(range(32))
    gathered = np.concatenate(shares)
    assert gathered[gathered_order(32, offsets, 4)].tolist() == list(range(32))
    with pytest.raises(ValueError, match="2 x 4 equal chunks"):
        chunk_indices(12, 0, 4)


def test_labels_travel_with_their_tokens():
    def sample(length, positions, record):
        return Sample(np.arange(100 * record, 100 * record + length, dtype=np.int32), np.asarray(positions, np.int32),
                      np.linspace(0, 1, len(positions), dtype=np.float32), np.arange(len(positions), dtype=np.int32),
                      record)

    batch = collate_packed([sample(5, [0, 4], 1), sample(8, [3, 4, 7], 2)], 0, PackingOptions(32, sample_multiple=4))
    assert batch.cu_seqlens_padded.tolist() == [0, 8, 16]
    seen = []
    for rank in range(2):
        local = split_for_context_parallel(batch, rank, 2)
        assert local.tokens.shape == (1, 8) and local.cu_seqlens_padded.tolist() == [0, 8, 16]  # whole-row offsets
        # the real-token mask travels with the tokens: ids 100-104 and 200-207 are real, padding (0) is not
        assert torch.equal(local.real_tokens, local.tokens != 0)
        for (row, position), record, step in zip(local.reward_index.tolist(), local.record_ids.tolist(),
                                                 local.step_ids.tolist()):
            token = int(local.tokens[row, position])
            seen.append((record, step))
            assert token == 100 * record + int(sample(5, [0, 4], 1).label_positions[step] if record == 1 else
                                               sample(8, [3, 4, 7], 2).label_positions[step])
    assert sorted(seen) == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]


def _cp_run(out, family, fmt, cp, tp=1, pp=1, reference=None):
    script = [str(REPO / "tests" / "context_parallel_grads.py"), str(out), family, fmt, str(cp)]
    if reference is not None:
        script += [str(tp), str(pp), str(reference)]
    run_script(script, cp * tp * pp)
    return load_file(out)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The one-process run of each (family, format), made once: its weights seed the split runs."""
    runs = {}

    def run(family, fmt):
        if (family, fmt) not in runs:
            path = tmp_path_factory.mktemp("cp1") / f"{family}-{fmt}.safetensors"
            runs[family, fmt] = (path, _cp_run(path, family, fmt, 1))
        return runs[family, fmt]

    return run


def _assert_equal_to_one_rank(split, reference):
    assert torch.equal(split["keys"], reference["keys"])
    torch.testing.assert_close(split["logits"], reference["logits"], rtol=0, atol=1e-6)
    assert split.keys() == reference.keys()
    for name in reference:
        if name.startswith("grad."):
            assert reference[name].abs().max() > 0, name
            torch.testing.assert_close(split[name], reference[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("family, fmt", [("llama3", "padded"), ("qwen2", "packed")])
def test_context_parallel_logits_and_gradients_equal_one_rank(tmp_path, one_rank, family, fmt):
    """CP 2 and 4 against CP 1 in fp32: every labelled step's reward logits and every parameter's gradient
    within 1e-6, with Llama-3 RoPE scaling (padded rows) and YaRN (packed rows, samples shorter than
    2 x CP), placeholders on chunk boundaries."""
    path, reference = one_rank(family, fmt)
    assert reference["logits"].shape[0] >= 13
    for cp in (2, 4):
        _assert_equal_to_one_rank(_cp_run(tmp_path / f"cp{cp}.safetensors", family, fmt, cp), reference)


@pytest.mark.parametrize("family, fmt, tp, pp", [("qwen2", "packed", 2, 1), ("llama3", "padded", 1, 2)],
                         ids=["cp2_tp2_sp", "cp2_pp2"])
def test_context_parallel_with_tensor_or_pipeline_parallelism_equals_one_rank(tmp_path, one_rank, family, fmt,
                                                                               tp, pp):
    """CP2 x TP2 (sequence parallel, packed rows) and CP2 x PP2 (padded rows) against one process with the
    same weights, through Megatron-Core's schedule: logits and every gradient within 1e-6 (the shards of
    tensor-parallel gradients put back together, the pipeline stages' layers by their global index)."""
    path, reference = one_rank(family, fmt)
    _assert_equal_to_one_rank(_cp_run(tmp_path / "split.safetensors", family, fmt, 2, tp, pp, path), reference)


ARCH = Architecture(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
                    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02)


def test_layout_counts_context_parallel_ranks():
    config = load_config(None, ["--context-parallel-degree", "2", "--tensor_parallel_degree", "2",
                                "--sequence_parallel", "true"])
    layout, _ = resolve_layout(config, 8, ARCH)
    assert (layout.context_parallel_size, layout.data_parallel_size, layout.world_size) == (2, 2, 8)
    assert (layout.sample_multiple, layout.sequence_multiple) == (4, 8)
    with pytest.raises(ConfigError, match="world size 6 is not divisible by tensor_parallel_degree 2 x "
                                          "context_parallel_degree 2 x pipeline_parallel_degree 1 = 4"):
        resolve_layout(config, 6, ARCH)
    with pytest.raises(ConfigError, match="cp_comm_type must be one of 'p2p', 'a2a', 'all_gather', 'a2a\\+p2p'"):
        load_config(None, ["--cp_comm_type", "ring"])
    with pytest.raises(ConfigError, match="context_parallel_degree must be at least 1"):
        load_config(None, ["--context_parallel_degree", "0"])


def test_score_refuses_context_parallelism_with_an_alternative(tmp_path):
    result = run_cli(["score", "--checkpoint", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "--output",
                      str(tmp_path / "s.jsonl"), "--context_parallel_degree", "2"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "score runs without context parallelism" in result.stderr and "--tensor_parallel_degree" in result.stderr


def test_plan_divides_activations_by_context_parallelism_and_by_tensor_parallelism_where_split():
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.plan import activation_bytes

    tokens = 4096  # per layer: s h (10 + 24 f / 4h) = s x 64 x (10 + 12) bytes, 4 layers
    assert activation_bytes(ARCH, ParallelLayout(), tokens, False) == 4 * tokens * 64 * 22
    assert activation_bytes(ARCH, ParallelLayout(context_parallel_size=2), tokens, False) == 4 * tokens * 64 * 11
    assert activation_bytes(ARCH, ParallelLayout(context_parallel_size=4), tokens, False) == 4 * tokens * 64 * 22 // 4
    # Tensor parallelism splits the 10 s h of norms and residuals only under sequence parallelism.
    assert activation_bytes(ARCH, ParallelLayout(tensor_parallel_size=2), tokens, False) == 4 * tokens * 64 * 16
    assert activation_bytes(ARCH, ParallelLayout(tensor_parallel_size=2, sequence_parallel=True), tokens,
                            False) == 4 * tokens * 64 * 11
    # Full recompute keeps each layer's input (2 s h, split only under sequence parallelism) + one layer.
    assert activation_bytes(ARCH, ParallelLayout(tensor_parallel_size=2), tokens, True) == (
        4 * 2 * tokens * 64 + tokens * 64 * 16)


def test_a_chunk_attends_causally_at_the_lower_right_without_keeping_its_mask():
    import torch.nn.functional as F

    from megatron_prm.model.context_parallel_attention import attend_chunk

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, 8, generator=generator, requires_grad=True)
               for heads, length in ((4, 6), (2, 16), (2, 16)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = attend_chunk(attend, q, k, v)
    assert not any(t.dtype == torch.bool for t in saved)  # the 6 x 16 mask is rebuilt in the backward pass
    # The chunk is the last 6 of 16 positions: equal to full causal attention's last 6 rows.
    padded_q = torch.cat([torch.zeros(1, 4, 10, 8), q], dim=2)
    full = F.scaled_dot_product_attention(padded_q, k, v, is_causal=True, enable_gqa=True)[:, :, 10:]
    torch.testing.assert_close(out, full, rtol=0, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = torch.autograd.grad(full.square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
