"""Packed-row attention without Transformer Engine: which kernel runs where, and the flash varlen call.

The varlen kernel runs on CUDA only; here its arguments (offsets, longest sample, causality, GQA, scale)
are prepared exactly as on a GPU and run through a reference varlen implementation (plain softmax
attention per delimited sample), and the whole model's loss and gradients through that path must
equal the per-sample SDPA path. The prepared call is also checked against the installed torch's own
``varlen_attn`` on meta tensors (its argument checks and output shape, without a GPU).
"""

import inspect
import math

import numpy as np
import pytest
import torch

from megatron_prm.data.batching import collate_packed
from megatron_prm.data.packing import PackingOptions
from megatron_prm.data.samples import Sample
from megatron_prm.model import attention
from megatron_prm.model.attention import SDPA_PER_SAMPLE, VARLEN, packed_attention_kernel, varlen_call

PLACEHOLDER = 3
INSTALLED = attention.installed_varlen_attn()
INSTALLED_PARAMETERS = frozenset(inspect.signature(INSTALLED).parameters)
TORCH_2_10_PARAMETERS = frozenset({"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal",
                                   "return_aux"})


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, scale=None,
                          window_size=(-1, -1), enable_gqa=False, return_aux=None):
    """What flash varlen attention computes, in plain torch: softmax attention within each delimited
    sequence. Rows outside every sequence stay NaN, so a call that leaves part of a row uncovered fails."""
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    assert isinstance(max_q, int) and isinstance(max_k, int)
    assert window_size in ((-1, -1), (-1, 0)) and isinstance(window_size, tuple)
    causal = is_causal or window_size == (-1, 0)
    heads, groups = query.shape[1], key.shape[1]
    assert heads == groups or (enable_gqa and heads % groups == 0)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    out = torch.full_like(query, float("nan"))
    offsets = cu_seq_q.tolist()
    for start, end in zip(offsets[:-1], offsets[1:]):
        assert end - start <= max_q
        q = query[start:end].transpose(0, 1)
        k, v = (t[start:end].transpose(0, 1).repeat_interleave(heads // groups, dim=0) for t in (key, value))
        scores = q @ k.transpose(1, 2) * scale
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        out[start:end] = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1)
    return out


def sample(rng, length, n_labels, record_index):
    ids = rng.integers(10, 250, size=length).astype(np.int32)
    positions = np.sort(rng.choice(np.arange(2, length), size=n_labels, replace=False)).astype(np.int32)
    ids[positions] = PLACEHOLDER
    return Sample(ids, positions, rng.random(n_labels).astype(np.float32), np.arange(n_labels, dtype=np.int32),
                  record_index)


def packed_row(seed, lengths=(9, 23, 14, 5)):
    rng = np.random.default_rng(seed)
    samples = [sample(rng, n, 2, i) for i, n in enumerate(lengths)]
    # Samples padded to a multiple of 4 and the row to a multiple of 16: padding inside and after.
    return collate_packed(samples, 0, PackingOptions(128, sample_multiple=4, row_multiple=16))


def test_varlen_runs_on_cuda_in_half_precision_only():
    assert packed_attention_kernel("cuda", torch.bfloat16, True, 0.0) == VARLEN
    assert packed_attention_kernel("cuda", torch.float16, True, 0.0) == VARLEN
    assert packed_attention_kernel("cuda", torch.float32, True, 0.0) == SDPA_PER_SAMPLE  # flash has no fp32
    assert packed_attention_kernel("cpu", torch.bfloat16, True, 0.0) == SDPA_PER_SAMPLE
    assert packed_attention_kernel("cuda", torch.bfloat16, False, 0.0) == SDPA_PER_SAMPLE  # torch < 2.10
    assert packed_attention_kernel("cuda", torch.bfloat16, True, 0.1) == SDPA_PER_SAMPLE  # varlen has no dropout
    assert INSTALLED is not None  # torch 2.10+ (the test venvs hold 2.13 and 2.14)


@pytest.mark.parametrize("parameters", [INSTALLED_PARAMETERS, TORCH_2_10_PARAMETERS], ids=["installed", "torch2.10"])
def test_varlen_call_equals_per_sample_sdpa(tiny_model, parameters):
    module = tiny_model.decoder.layers[0].self_attention.core_attention
    batch = packed_row(0)
    params = batch.packed_seq_params()
    total = batch.tokens.shape[1]
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(total, 4, 16, generator=generator)
    key, value = (torch.randn(total, 2, 16, generator=generator) for _ in range(2))
    call = varlen_call(query, key, value, params, module.scale, parameters)
    offsets = call.args[3]
    assert offsets.dtype == torch.int32 and offsets.tolist() == batch.cu_seqlens_padded.tolist()
    assert offsets[-1].item() == total and call.args[5] == call.args[6] == params.max_seqlen_q == 24
    if parameters is INSTALLED_PARAMETERS:
        assert call.kwargs == {"window_size": (-1, 0), "scale": module.scale, "enable_gqa": True}
        assert call.args[1] is key  # no copies of the key/value heads
    else:
        assert call.kwargs == {"is_causal": True} and call.args[1].shape == (total, 4, 16)
    varlen = call(reference_varlen_attn).reshape(total, 64)
    per_sample = module._packed(query, key, value, params)
    assert torch.isfinite(varlen).all()
    real = torch.cat([torch.arange(s, s + n) for s, n in zip(batch.cu_seqlens_padded[:-1].tolist(),
                                                            (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist())])
    torch.testing.assert_close(varlen[real], per_sample[real], rtol=0, atol=1e-6)


def test_varlen_call_is_accepted_by_the_installed_kernel():
    """The installed torch's varlen_attn (argument checks and shape function) takes the prepared call."""
    batch = packed_row(2)
    total = batch.tokens.shape[1]
    query = torch.empty(total, 8, 16, dtype=torch.bfloat16, device="meta")
    key, value = (torch.empty(total, 2, 16, dtype=torch.bfloat16, device="meta") for _ in range(2))
    params = batch.packed_seq_params()
    params.cu_seqlens_q_padded = params.cu_seqlens_q_padded.to("meta")
    call = varlen_call(query, key, value, params, 0.25, INSTALLED_PARAMETERS)
    assert call(INSTALLED).shape == (total, 8, 16)


def test_model_through_the_varlen_path_equals_the_sdpa_path(tiny_model, monkeypatch):
    """Loss and every gradient of the model on packed rows: varlen path (reference kernel) = SDPA path."""
    from megatron_prm.loss import step_losses

    model = tiny_model
    batches = [packed_row(3), packed_row(4, lengths=(31, 7, 40))]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            logits = model(batch.tokens, batch.position_ids, None, reward_index=batch.reward_index,
                           packed_seq_params=batch.packed_seq_params())
            loss = step_losses(logits, batch.label_values).sum()
            loss.backward()
            total += loss.item()
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    per_sample_loss, per_sample_grads = loss_and_grads()
    calls = []

    def counted_kernel(*args, **kwargs):
        calls.append(args[3].tolist())
        return reference_varlen_attn(*args, **kwargs)

    monkeypatch.setattr(attention, "packed_attention_kernel", lambda *args: VARLEN)
    for layer in model.decoder.layers:
        monkeypatch.setattr(layer.self_attention.core_attention, "varlen_attn", counted_kernel)
    varlen_loss, varlen_grads = loss_and_grads()
    assert calls == [b.cu_seqlens_padded.tolist() for b in batches for _ in model.decoder.layers]  # one call a row
    assert varlen_loss == pytest.approx(per_sample_loss, rel=1e-6)
    assert varlen_grads.keys() == per_sample_grads.keys()
    for name, grad in per_sample_grads.items():
        torch.testing.assert_close(varlen_grads[name], grad, rtol=0, atol=1e-6, msg=name)
