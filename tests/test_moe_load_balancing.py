"""The MoE load-balancing loss the training computes is transformers' ``load_balancing_loss_func`` on the same
router logits (padding excluded as its ``attention_mask`` excludes it, in padded and in packed rows), and its
gradient is the coefficient times that function's, averaged over the micro batches (one process, CPU mode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prm.config import TrainingArguments, load_config
from megatron_prm.data.batching import collate, collate_packed
from megatron_prm.data.packing import PackingOptions
from megatron_prm.data.samples import Sample
from megatron_prm.forward_step import make_train_forward_step
from megatron_prm.layout import ParallelLayout

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB, COEFFICIENT = 256, 0.02
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, initializer_range=0.2, num_experts_per_tok=2, tie_word_embeddings=False)
FAMILIES = {
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **SHAPE, head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=4, norm_topk_prob=True)),
    # three layers, the middle one dense: the routing pooled over the sparse layers only, as transformers does
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **{**SHAPE, "num_hidden_layers": 3}, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_experts=4, norm_topk_prob=False, mlp_only_layers=[1])),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**SHAPE, intermediate_size=16, num_local_experts=4)),
}
GOOD, BAD, PLACEHOLDER = 7, 200, 3


def sample(rng: np.random.Generator, length: int, record: int) -> Sample:
    ids = rng.integers(10, VOCAB - 10, size=length).astype(np.int32)
    positions = np.sort(rng.choice(np.arange(3, length), size=2, replace=False)).astype(np.int32)
    ids[positions] = PLACEHOLDER
    return Sample(ids, positions, (rng.random(2) < 0.5).astype(np.float32), np.arange(2, dtype=np.int32), record)


def as_padded_rows(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' input for ``samples``: right-padded rows and their attention mask."""
    longest = max(len(s) for s in samples)
    tokens, mask = torch.zeros(len(samples), longest, dtype=torch.long), torch.zeros(len(samples), longest,
                                                                                       dtype=torch.long)
    for row, s in enumerate(samples):
        tokens[row, :len(s)], mask[row, :len(s)] = torch.from_numpy(s.input_ids.astype(np.int64)), 1
    return tokens, mask


def saved_and_imported(folder, name: str):
    """A tiny random model of family ``name`` saved by transformers (``folder/hf``) and imported (``megatron``)."""
    from megatron_prm.conversion.importer import import_hf

    torch.manual_seed(0)
    FAMILIES[name]().save_pretrained(folder / "hf")
    import_hf(folder / "hf", folder / "megatron", progress=False)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    return saved_and_imported(tmp_path_factory.mktemp(request.param), request.param)


def megatron_step(folder, groups, coefficient: float, recompute: bool = False):
    """One training forward/backward pass over micro batches ``groups`` (padded rows, or packed rows where a
    group is a tuple), optionally recomputing whole layers: the reports and the router and embedding
    gradients."""
    from megatron_prm.checkpoint import MODEL_CONFIG_NAME, load_model_weights
    from megatron_prm.model.architecture import Architecture, read_hf_config
    from megatron_prm.model.load_balancing import install_load_balancing
    from megatron_prm.model.provider import ModelBuildOptions, Recompute, build_model_chunks
    from megatron_prm.runtime import init_runtime, shutdown
    from megatron_prm.training_state import build_training_state

    path = folder / "megatron" / MODEL_CONFIG_NAME
    arch = Architecture.from_hf_config(read_hf_config(path), str(path))
    init_runtime("cpu", 0, ParallelLayout())
    try:
        options = ModelBuildOptions(use_cpu_initialization=True, recompute=Recompute() if recompute else None)
        chunks = build_model_chunks(arch, (GOOD, BAD), 128, options)
        load_model_weights(chunks, folder / "megatron", arch)
        balance = install_load_balancing(chunks, arch.moe, coefficient, ParallelLayout())
        state = build_training_state(chunks, TrainingArguments(bf16=False, max_steps=2, max_grad_norm=0.0), 2)
        batches = [collate_packed(list(g), 0, PackingOptions(128)) if isinstance(g, tuple) else collate(g, 0)
                   for g in groups]
        if balance is not None:
            balance.begin_step(sum(b.label_values.numel() for b in batches), len(batches), torch.device("cpu"))
        for chunk in state.model:
            chunk.zero_grad_buffer()
        reports = get_forward_backward_func()(
            forward_step_func=make_train_forward_step(torch.device("cpu"), 0.5), data_iterator=iter(batches),
            model=state.model, num_microbatches=len(batches), seq_length=max(b.tokens.shape[1] for b in batches),
            micro_batch_size=max(b.tokens.shape[0] for b in batches), forward_only=False)
        grads = {name: p.main_grad.clone() for name, p in state.model[0].module.named_parameters()
                 if name.endswith("router.weight") or name == "embedding.word_embeddings.weight"}
        return reports, grads
    finally:
        shutdown()


def test_load_balancing_loss_and_gradient_equal_transformers(family):
    rng = np.random.default_rng(1)
    groups = [[sample(rng, 11, 0), sample(rng, 20, 1)],  # padded rows: 9 padding tokens in the first
              (sample(rng, 9, 2), sample(rng, 14, 3), sample(rng, 6, 4))]  # one packed row of three samples
    reports, with_aux = megatron_step(family, groups, COEFFICIENT)
    _, without = megatron_step(family, groups, 0.0)

    hf = AutoModelForCausalLM.from_pretrained(family / "hf", dtype=torch.float32)
    hf.train()
    total = 0.0
    for report, group in zip(reports, groups):
        tokens, mask = as_padded_rows(list(group))
        aux = hf(tokens, attention_mask=mask, output_router_logits=True).aux_loss
        got = report["moe_load_balancing_loss"].item()
        assert abs(got - aux.item()) <= 1e-6, (got, aux.item())
        total = total + aux
    # The optimised loss is the PRM loss plus the coefficient times the micro batches' mean aux loss.
    (COEFFICIENT * total / len(groups)).backward()
    names = {"embedding.word_embeddings.weight": "model.embed_tokens.weight"}
    names.update({f"decoder.layers.{i}.mlp.router.weight": f"model.layers.{i}.mlp.gate.weight"
                  for i in range(hf.config.num_hidden_layers) if hasattr(hf.model.layers[i].mlp, "gate")})
    hf_params = dict(hf.named_parameters())
    assert names.keys() == with_aux.keys()
    for ours, theirs in names.items():
        expected = hf_params[theirs].grad
        difference = with_aux[ours] - without[ours]
        assert expected.abs().max() > 0
        # Both runs round the PRM loss's gradient (up to 1.5 here, measured 3e-7 x that in the difference).
        tolerance = 1e-4 * expected.abs().max().item() + 1e-6 * without[ours].abs().max().item()
        torch.testing.assert_close(difference, expected, rtol=0, atol=tolerance, msg=ours)


def test_recomputed_layers_get_the_same_gradient(tmp_path):
    """Full recompute: the forward pass pools the routing without autograd, and the layers recomputed in the
    backward pass receive the injected gradient."""
    family = saved_and_imported(tmp_path, "qwen3_moe")
    rng = np.random.default_rng(2)
    groups = [[sample(rng, 12, 0), sample(rng, 17, 1)]]
    reports, expected = megatron_step(family, groups, COEFFICIENT)
    recomputed_reports, got = megatron_step(family, groups, COEFFICIENT, recompute=True)
    assert recomputed_reports[0]["moe_load_balancing_loss"] == reports[0]["moe_load_balancing_loss"]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_pipeline_parallel_falls_back_to_megatrons_per_layer_loss():
    from megatron_prm.model.architecture import Architecture
    from megatron_prm.model.load_balancing import install_load_balancing, pipeline_note
    from megatron_prm.model.moe import MixtureOfExperts
    from megatron_prm.model.provider import ModelBuildOptions, transformer_config

    moe = MixtureOfExperts(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, norm_topk_prob=True,
                           router_aux_loss_coef=0.01)
    arch = Architecture(model_type="qwen3_moe", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64,
                        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02, moe=moe)
    for layout, coefficient, megatron in ((ParallelLayout(pipeline_parallel_size=2), None, 0.01),
                                          (ParallelLayout(pipeline_parallel_size=2), 0.5, 0.5),
                                          (ParallelLayout(pipeline_parallel_size=2), 0.0, 0.0),
                                          (ParallelLayout(), 0.5, 0.0)):
        if layout.pipeline_parallel_size > 1:
            assert install_load_balancing([], moe, coefficient, layout) is None
        config = load_config(None, [] if coefficient is None else ["--moe_aux_loss_coeff", str(coefficient)])
        options = ModelBuildOptions.from_config(config, layout, False, True, moe)
        megatron_config = transformer_config(arch, options)
        assert megatron_config.moe_aux_loss_coeff == megatron
        assert megatron_config.moe_router_load_balancing_type == ("aux_loss" if megatron else "none")
        assert (pipeline_note(moe, coefficient, layout) is not None) == bool(megatron)
