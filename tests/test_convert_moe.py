"""Mixture-of-Experts bases (Qwen3-MoE, Qwen2-MoE, Mixtral): HF import gives Megatron logits equal to
transformers' (local experts, dropless all-to-all routing) under TP1, TP2 and PP2, and import -> export
is bitwise with transformers' per-expert tensor names. The Qwen2-MoE model keeps its first layer dense
(``mlp_only_layers``), so a model of mixed layers goes through every check too."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script

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

from lm_logits import BATCH, SEQ, fixed_tokens  # noqa: E402

VOCAB = 300
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1, num_experts_per_tok=2)
# The two routings: renormalised top-k probabilities (Qwen3-MoE with norm_topk_prob, Mixtral) and the raw
# softmax probabilities of the top k (Qwen2-MoE as Qwen1.5-MoE ships it), the latter with the shared expert
# and a dense first layer (under PP2 one stage holds the dense layer, the other the sparse one).
FAMILIES = {
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **SHAPE, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4, norm_topk_prob=True,
        rope_theta=1000000.0)),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **SHAPE, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
        norm_topk_prob=False, mlp_only_layers=[0], rope_theta=1000000.0)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**SHAPE, intermediate_size=32, num_local_experts=4,
                                                        rope_theta=1000000.0)),
}


def _randomize_small_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights and biases start at 1 / 0 in transformers: make them random so that a swapped or
    dropped one changes the logits."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each family saved by transformers (per-expert tensor names) and imported."""
    from megatron_prm.conversion.importer import import_hf

    root = tmp_path_factory.mktemp("convert_moe")
    paths = {}
    for name, build in FAMILIES.items():
        torch.manual_seed(0)
        hf = root / name
        _randomize_small_weights(build()).save_pretrained(hf)
        import_hf(hf, root / f"{name}-megatron", progress=False)
        paths[name] = hf
    return root, paths


def hf_logits(directory) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(fixed_tokens(VOCAB)).logits


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 2)])
def test_megatron_logits_equal_transformers(models, tmp_path, tp, pp, ep):
    """TP2, PP2, EP2 (2 of the 4 experts per rank, tokens exchanged by all-to-all) and EP2 x TP2 (4 ranks,
    each expert split in two) against transformers."""
    root, paths = models
    out = tmp_path / "logits.pt"
    checkpoints = [str(root / f"{name}-megatron") for name in FAMILIES]
    script = [str(REPO / "tests" / "lm_logits.py"), str(out), str(tp), str(pp), "--ep", str(ep), *checkpoints]
    run_script(script, tp * pp * ep)
    megatron = torch.load(out, weights_only=True)
    for name, checkpoint in zip(FAMILIES, checkpoints):
        reference = hf_logits(paths[name])
        assert megatron[checkpoint].shape == (BATCH, SEQ, VOCAB)
        assert (megatron[checkpoint] - reference).abs().max().item() <= 1e-4, name


def test_routing_is_visible_in_the_logits(models):
    """The check can see the router semantics: renormalising Qwen2-MoE's top-k probabilities, or dropping
    its shared-expert gate, changes the logits far beyond 1e-4."""
    _, paths = models
    reference = hf_logits(paths["qwen2_moe"])
    model = AutoModelForCausalLM.from_pretrained(paths["qwen2_moe"], dtype=torch.float32, norm_topk_prob=True)
    with torch.no_grad():
        assert (model(fixed_tokens(VOCAB)).logits - reference).abs().max() > 1e-3
        for layer in model.model.layers[1:]:  # layer 0 is dense
            layer.mlp.gate.norm_topk_prob = False
            layer.mlp.shared_expert_gate.weight.zero_()  # sigmoid(0) = 1/2
        assert (model(fixed_tokens(VOCAB)).logits - reference).abs().max() > 1e-3


LAST_EXPERT = {"qwen3_moe": "mlp.experts.3.gate_proj", "qwen2_moe": "mlp.experts.3.up_proj",
               "mixtral": "block_sparse_moe.experts.3.w2"}


def test_round_trip_is_bitwise_with_per_expert_names(models, tmp_path):
    from megatron_prm.conversion.exporter import export_hf

    root, paths = models
    for name, hf in paths.items():
        out = tmp_path / name
        export_hf(root / f"{name}-megatron", out, progress=False)
        original, exported = load_file(hf / "model.safetensors"), load_file(out / "model.safetensors")
        assert original.keys() == exported.keys(), name
        for key in original:
            assert original[key].dtype == exported[key].dtype and torch.equal(original[key], exported[key]), key
        assert json.loads((hf / "config.json").read_text()) == json.loads((out / "config.json").read_text())
        assert f"model.layers.1.{LAST_EXPERT[name]}.weight" in exported


def test_every_moe_family_has_a_token_classifier_in_transformers():
    """``--as token-classifier`` writes {hf_prefix}ForTokenClassification (tests/test_moe_training.py scores the
    Qwen3-MoE one end to end): transformers 5 has that class for every MoE family."""
    import transformers

    from megatron_prm.model.architecture import FAMILIES as ARCHITECTURES

    moe = [family for family in ARCHITECTURES.values() if family.moe is not None]
    assert sorted(f.model_type for f in moe) == sorted(FAMILIES)
    for family in moe:
        assert family.hf_prefix + "ForCausalLM" == type(FAMILIES[family.model_type]()).__name__
        assert hasattr(transformers, family.hf_prefix + "ForTokenClassification"), family.model_type


@pytest.mark.parametrize("name", list(FAMILIES))
def test_mapping_names_cover_the_built_model(models, name):
    """Every parameter of the built local-spec MoE model is named by the table, and every tensor of its
    checkpoint by the checkpoint names (experts stacked along their own axis; each layer on its own keys in
    the Qwen2-MoE model of mixed layers); ``plan`` counts them all."""
    from megatron_prm.conversion.mapping import checkpoint_key, experts_of, layers_of, layers_stacked, rules_for
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.model.architecture import Architecture, read_hf_config
    from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
    from megatron_prm.plan import stage_parameters
    from megatron_prm.runtime import init_runtime, shutdown

    _, paths = models
    arch = Architecture.from_hf_config(read_hf_config(paths[name]), name)
    assert arch.mixed_layers == (name == "qwen2_moe")
    init_runtime("cpu", 0, ParallelLayout())
    try:
        (model,) = build_model_chunks(arch, (1, 2), 32, ModelBuildOptions(use_cpu_initialization=True))
        local_names = {k for k in model.state_dict() if not k.endswith("_extra_state")}
        checkpoint_keys = {v.key for v in model.sharded_state_dict().values() if not v.key.endswith("_extra_state")}
        built = sum(p.numel() for p in model.parameters())
    finally:
        shutdown()
    assert stage_parameters(arch, ParallelLayout(), 0).total == built
    rules = rules_for(arch)
    assert local_names == {r.megatron_name(layer, spec="local", expert=expert) for r in rules
                           for layer in layers_of(r, arch) for expert in experts_of(r, arch)}
    assert checkpoint_keys == {checkpoint_key(r, arch, layer) for r in rules
                               for layer in (layers_of(r, arch) if not layers_stacked(arch) else [None])}
    assert "decoder.layers.pre_mlp_layernorm.weight" in checkpoint_keys or name == "qwen2_moe"  # as TE's MoE spec


def test_plan_counts_every_parameter_and_the_active_ones(models):
    """``plan``'s total equals transformers' parameter count; per token only 2 of the 4 experts are active."""
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.model.architecture import Architecture, read_hf_config
    from megatron_prm.plan import expert_parameters, model_parameters, stage_parameters

    _, paths = models
    for name, hf in paths.items():
        arch = Architecture.from_hf_config(read_hf_config(hf), name)
        counted = model_parameters(arch)
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        assert counted["total"] == sum(p.numel() for p in model.parameters()), name
        sparse_layers = 1 if name == "qwen2_moe" else 2
        idle_experts = sparse_layers * 2 * 3 * 64 * 32  # 2 idle experts x (gate, up, down) x h x expert size per layer
        assert counted["active_per_token"] == counted["total"] - idle_experts, name
    mixed = Architecture.from_hf_config(read_hf_config(paths["qwen2_moe"]), "qwen2_moe")
    stages = [stage_parameters(mixed, ParallelLayout(pipeline_parallel_size=2), stage) for stage in (0, 1)]
    assert [s.experts for s in stages] == [0, expert_parameters(mixed, 1)]  # the dense layer 0, the sparse layer 1
    assert stages[1].layers - stages[0].layers == (4 * 3 * 64 * 32 + 4 * 64 + 3 * 64 * 48 + 64) - 3 * 64 * 96


def test_plan_shards_the_experts_optimizer_state_over_expert_data_parallel_ranks():
    """Qwen3-30B-A3B's shape at EP8: the experts' Adam state over world / (EP x ETP x PP) ranks, the rest
    over the data-parallel ones (Megatron's distributed optimizer keeps the two groups apart)."""
    from megatron_prm.config import load_config
    from megatron_prm.layout import resolve_layout
    from megatron_prm.model.architecture import Architecture, read_hf_config
    from megatron_prm.plan import expert_parameters, plan, stage_parameters

    hf = REPO / "examples/configs/qwen3_30b_a3b_config.json"
    arch = Architecture.from_hf_config(read_hf_config(hf), str(hf))
    config = load_config(None, ["--model-config", str(hf), "--expert-parallel-degree", "8", "--sharding", "stage1",
                                "--max-seq-len", "4096", "--recompute", "true"])
    for world, expert_data_parallel in ((8, 1), (16, 2)):
        result = plan(config, arch, world // 8, 8, 80.0)
        assert result["parameters"]["total"] == 30_532_122_624 and result["parameters"]["active_per_token"] < 3.4e9
        layout, _ = resolve_layout(config, world, arch)
        trainable = stage_parameters(arch, layout, 0).trainable
        experts = 48 * expert_parameters(arch, 1, 8, 1)
        assert experts == 48 * 128 * 3 * 2048 * 768 // 8
        expected = -(-(trainable - experts) * 12 // world) + -(-experts * 12 // expert_data_parallel)
        assert result["memory_bytes"]["optimizer"] == expected
        # A checkpoint holds every expert once (bf16 weights + 12 bytes of Adam state per parameter, TP1); each rank
        # writes 1/DP of the dense part and 1/EDP of its experts.
        checkpoint = result["checkpoint"]
        assert checkpoint["checkpoint_bytes"] == 30_532_122_624 * 14
        assert checkpoint["written_per_rank_bytes"] == -(-(trainable - experts) * 14 // world) + experts * 14 // expert_data_parallel
