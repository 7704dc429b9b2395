"""Packing: the row plans, THD batches, and equality with unpacked training on a tiny model."""

import numpy as np
import pytest
import torch

from megatron_prm.data.batching import BatchLayout, collate, collate_packed, pad_to_length
from megatron_prm.data.packing import PackingOptions, RowLayout, pack, pack_best_fit_decreasing, pack_in_order
from megatron_prm.data.loader import PackedBatches, Packing
from megatron_prm.data.samples import Sample
from megatron_prm.data.store import InMemorySamples
from megatron_prm.loss import step_losses

PLACEHOLDER = 3


def sample(rng, length, n_labels, record_index):
    ids = rng.integers(10, 250, size=length).astype(np.int32)
    positions = np.sort(rng.choice(np.arange(2, length), size=n_labels, replace=False)).astype(np.int32)
    ids[positions] = PLACEHOLDER
    return Sample(ids, positions, rng.random(n_labels).astype(np.float32), np.arange(n_labels, dtype=np.int32),
                  record_index)


def test_next_fit_keeps_arrival_order():
    rows = list(pack_in_order(enumerate([5, 4, 3, 6, 2]), PackingOptions(10)))
    assert rows == [[0, 1], [2, 3], [4]]


def test_best_fit_decreasing_fills_rows():
    lengths = [6, 5, 4, 3, 2]  # 20 tokens: two full rows of 10
    rows = pack_best_fit_decreasing(list(enumerate(lengths)), PackingOptions(10))
    assert sorted(sorted(lengths[i] for i in row) for row in rows) == [[2, 3, 5], [4, 6]]


def test_multiples_shape_the_rows():
    options = PackingOptions(16, sample_multiple=4, row_multiple=8)
    layout = RowLayout.of([5, 3], options)
    assert layout.cu_seqlens.tolist() == [0, 5, 8]
    assert layout.cu_seqlens_padded.tolist() == [0, 8, 16] and layout.length == 16
    assert list(pack_in_order(enumerate([5, 3, 9]), options)) == [[0, 1], [2]]  # 8 + 4 = 12 ≤ 16; 12 + 12 > 16
    with pytest.raises(ValueError, match="does not fit"):
        list(pack_in_order([(0, 17)], options))


def test_packed_row_positions_restart_and_labels_stay_on_their_steps():
    rng = np.random.default_rng(0)
    samples = [sample(rng, n, 2, i) for i, n in enumerate((7, 9, 5))]
    batch = collate_packed(samples, pad_id=0, options=PackingOptions(32, sample_multiple=2, row_multiple=4))
    assert batch.tokens.shape == (1, 24) and batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 7, 16, 21] and batch.cu_seqlens_padded.tolist() == [0, 8, 18, 24]
    assert batch.position_ids[0, :10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert torch.all(batch.tokens[0, batch.reward_index[:, 1]] == PLACEHOLDER)
    unpacked = collate(samples, pad_id=0)
    for name in ("label_values", "record_ids", "step_ids"):
        assert torch.equal(getattr(batch, name), getattr(unpacked, name))
    params = batch.packed_seq_params()
    assert params.qkv_format == "thd" and params.max_seqlen_q == 10
    # real_tokens (the MoE load-balancing loss's attention mask) leaves out every sample's padding
    real = [index for start, n in ((0, 7), (8, 9), (18, 5)) for index in range(start, start + n)]
    assert batch.real_tokens[0].nonzero().flatten().tolist() == real
    assert unpacked.real_tokens.sum(1).tolist() == [7, 9, 5] and not unpacked.real_tokens[0, 7:].any()
    longer = pad_to_length(batch, 32, pad_id=0)
    assert longer.cu_seqlens_padded.tolist() == [0, 8, 18, 32] and longer.cu_seqlens.tolist() == [0, 7, 16, 21]
    assert torch.equal(longer.real_tokens[:, :24], batch.real_tokens) and not longer.real_tokens[:, 24:].any()


def test_packed_epochs_use_every_sample_once_over_data_parallel_ranks():
    rng = np.random.default_rng(1)
    source = InMemorySamples([sample(rng, int(n), 1, i) for i, n in enumerate(rng.integers(10, 60, size=200))])
    for mode in ("zero_padding", "greedy_zero_padding"):
        packing = Packing(mode, PackingOptions(128), buffer_size=50)
        layout = BatchLayout(1, 2, 2)
        ranks = [PackedBatches(source, layout, rank, seed=3, packing=packing) for rank in range(2)]
        seen = []
        for step in range(ranks[0].steps_in_epoch(0)):
            for batches in ranks:
                for row in batches.next_microbatches():
                    assert sum(len(s) for s in row) <= 128
                    seen += [s.record_index for s in row]
        all_rows = ranks[0]._units(0)
        leftover = sum(len(row) for row in all_rows[ranks[0].steps_in_epoch(0) * 4:])
        assert len(seen) == len(set(seen)) == 200 - leftover
    zero = PackedBatches(source, BatchLayout(1, 1, 1), 0, 3, Packing("zero_padding", PackingOptions(128), 50))
    greedy = PackedBatches(source, BatchLayout(1, 1, 1), 0, 3, Packing("greedy_zero_padding", PackingOptions(128), 50))
    assert len(greedy._units(0)) < len(zero._units(0))


def loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for batch in batches:
        logits = model(batch.tokens, batch.position_ids, None, reward_index=batch.reward_index,
                       packed_seq_params=batch.packed_seq_params())
        losses = step_losses(logits, batch.label_values)
        losses.sum().backward()
        total += losses.sum().item()
        count += losses.numel()
    return total / count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["zero_padding", "greedy_zero_padding"])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model, mode):
    model = tiny_model
    rng = np.random.default_rng(2)
    samples = [sample(rng, int(n), 3, i) for i, n in enumerate(rng.integers(12, 70, size=9))]
    options = PackingOptions(128, sample_multiple=2, row_multiple=4)
    rows = list(pack(((s, len(s)) for s in samples), mode, options, buffer_size=9))
    assert 1 < len(rows) < len(samples)
    packed_loss, packed_grads = loss_and_grads(model, [collate_packed(row, 0, options) for row in rows])
    plain_loss, plain_grads = loss_and_grads(model, [collate(samples, pad_id=0)])
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5)
    assert packed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_no_attention_crosses_sample_boundaries(tiny_model):
    model = tiny_model
    rng = np.random.default_rng(3)
    samples = [sample(rng, n, 2, i) for i, n in enumerate((20, 30, 25))]
    options = PackingOptions(128)
    changed = Sample(samples[1].input_ids.copy(), samples[1].label_positions, samples[1].label_values,
                     samples[1].step_ids, 1)
    changed.input_ids[[0, 5, 11]] = (changed.input_ids[[0, 5, 11]] + 17) % 240 + 10  # placeholders untouched
    with torch.no_grad():
        outputs = []
        for row in (samples, [samples[0], changed, samples[2]]):
            batch = collate_packed(row, 0, options)
            outputs.append(model(batch.tokens, batch.position_ids, None, reward_index=batch.reward_index,
                                 packed_seq_params=batch.packed_seq_params()))
    first, second = outputs
    assert torch.equal(first[:2], second[:2]) and torch.equal(first[4:], second[4:])
    assert not torch.equal(first[2:4], second[2:4])


def test_packing_benchmark_on_processbench_gsm8k(tmp_path, shared_data):
    import json
    import subprocess
    import sys

    from conftest import MISTRAL, REPO
    from megatron_prm.data.convert import convert_file

    records = tmp_path / "pb.jsonl"
    convert_file("processbench", shared_data / "processbench" / "gsm8k.json.gz", records, show_progress=False)
    out = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_packing.py"), "--data", str(records),
                          "--tokenizer", MISTRAL, "--max-seq-len", "4096"], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["zero_padding"] >= 0.85
    # Best-fit decreasing reaches the fewest rows possible: ceil(tokens / max_seq_len).
    fewest_rows = -(-figures["tokens"] // 4096)
    assert figures["greedy_zero_padding"] == pytest.approx(figures["tokens"] / (fewest_rows * 4096), abs=1e-4)
    assert figures["greedy_zero_padding_full_rows"] >= 0.99
    assert figures["pad_to_max"] < figures["pad_to_longest_8"] < figures["zero_padding"] < figures["greedy_zero_padding"]
