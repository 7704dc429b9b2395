"""tools/convert_hf.py: HF Llama / Mistral / Qwen2 / Qwen3 <-> Megatron, logits equal under TP1/TP2/PP2, exact
round trip, clear errors without partial output, and an exported PRM that scores like the project's scorer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import MISTRAL, REPO, run_cli, run_script

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lm_logits import BATCH, SEQ, fixed_tokens  # noqa: E402

VOCAB = 1100  # padded to 1152 for TP1 and to 1280 for TP2: unpadding is exercised
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1)
FAMILIES = {
    "llama3": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_theta=500000.0)),
    "llama31": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama32": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_theta=500000.0, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, rope_theta=10000.0, sliding_window=None)),
    # Qwen2.5 small sizes: Q/K/V bias, tied embeddings; here with linear RoPE scaling.
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, rope_theta=1000000.0, tie_word_embeddings=True,
                                                  rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # Qwen3: per-head Q/K RMSNorm, head_dim 16 != 64 / 8; here with the YaRN scaling Qwen3 documents.
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16, rope_theta=1000000.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
}


def _randomize_small_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Biases and norm weights start at 0 / 1 in transformers: make them random so that a swapped or
    dropped one changes the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "tools/convert_hf.py", "--no-progress", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"convert_hf {args} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.mark.parametrize("config", [
    {"model_type": "llama"}, {"model_type": "qwen2", "tie_word_embeddings": True}, {"model_type": "qwen3", "head_dim": 16},
    {"model_type": "qwen2", "architectures": ["Qwen2ForProcessRewardModel"]},
], ids=["llama", "qwen2-tied", "qwen3", "qwen2-mlp-head"])
def test_mapping_names_cover_the_built_model_under_both_spellings(config):
    """Every parameter of a built local-spec model is named by the table (local names), and every
    tensor of its checkpoint by the checkpoint (TE-spec) names."""
    from megatron_prm.conversion.mapping import checkpoint_key, rules_for
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.model.architecture import Architecture
    from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
    from megatron_prm.runtime import init_runtime, shutdown

    arch = Architecture.from_hf_config({**SHAPE, **config}, "test")
    init_runtime("cpu", 0, ParallelLayout())
    try:
        (model,) = build_model_chunks(arch, (1, 2), 32, ModelBuildOptions(use_cpu_initialization=True))
        local_names = {k for k in model.state_dict() if not k.endswith("_extra_state")}
        checkpoint_keys = {v.key for v in model.sharded_state_dict().values() if not v.key.endswith("_extra_state")}
    finally:
        shutdown()
    rules = rules_for(arch)
    assert local_names == {r.megatron_name(layer, spec="local") for r in rules
                           for layer in (range(arch.num_hidden_layers) if r.per_layer else [None])}
    assert checkpoint_keys == {checkpoint_key(r, arch) for r in rules}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in {
        r.megatron_name(0) for r in rules}  # the TE spec's module name


def hf_logits(directory, **config_changes) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **config_changes)
    with torch.no_grad():
        return model(fixed_tokens(VOCAB)).logits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each family saved by transformers (Llama 3 as a sharded checkpoint with an index), imported at
    the default and at --tp 2 padding."""
    from megatron_prm.conversion.importer import import_hf

    root = tmp_path_factory.mktemp("convert")
    paths = {}
    for name, build in FAMILIES.items():
        torch.manual_seed(0)  # the same weights in every family: only the config differs
        hf = root / name
        model = build() if name.startswith(("llama", "mistral")) else _randomize_small_weights(build())
        model.save_pretrained(hf, max_shard_size="200KB" if name == "llama3" else "50MB")
        (hf / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
        # In this process: the command line's own import is run by the tests further down.
        import_hf(hf, root / f"{name}-tp1", progress=False)
        import_hf(hf, root / f"{name}-tp2", tensor_parallel=2, pipeline_parallel=2, progress=False)
        paths[name] = hf
    assert (root / "llama3" / "model.safetensors.index.json").is_file()
    return root, paths


@pytest.mark.parametrize("tp,pp,padding", [(1, 1, "tp1"), (2, 1, "tp2"), (1, 2, "tp1"), (2, 1, "tp1")])
def test_megatron_logits_equal_transformers(models, tmp_path, tp, pp, padding):
    root, paths = models
    out = tmp_path / "logits.pt"
    checkpoints = [str(root / f"{name}-{padding}") for name in FAMILIES]
    script = [str(REPO / "tests" / "lm_logits.py"), str(out), str(tp), str(pp), *checkpoints]
    run_script(script, tp * pp)
    megatron = torch.load(out, weights_only=True)
    reference = {name: hf_logits(paths[name]) for name in FAMILIES}
    for name, checkpoint in zip(FAMILIES, checkpoints):
        assert megatron[checkpoint].shape == (BATCH, SEQ, VOCAB)
        assert (megatron[checkpoint] - reference[name]).abs().max().item() <= 1e-4, name
    # The check can see the traps: RoPE theta and Llama-3 scaling change the logits far beyond 1e-4.
    assert (reference["llama3"] - reference["mistral"]).abs().max() > 1e-2
    assert (reference["llama3"] - reference["llama31"]).abs().max() > 1e-3
    for name in ("qwen2", "qwen3"):  # ... and so do the linear and YaRN scalings
        assert (reference[name] - hf_logits(paths[name], rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})).abs().max() > 1e-3, name


def test_round_trip_is_bitwise_and_sharded_output_loads(models, tmp_path):
    from megatron_prm.conversion.exporter import export_hf

    root, paths = models
    for name, hf in paths.items():
        out = tmp_path / name
        if name == "llama3":  # the command line, sharded output
            summary = json.loads(convert("export", "--megatron", str(root / f"{name}-tp1"), "--out", str(out),
                                         "--max-shard-size", "300KB").stdout)
        else:  # in this process: the command line adds nothing the llama3 case does not test
            summary = export_hf(root / f"{name}-tp1", out, progress=False)
        original = {}
        for file in hf.glob("*.safetensors"):
            original.update(load_file(file))
        exported = {}
        for file in out.glob("*.safetensors"):
            exported.update(load_file(file))
        assert original.keys() == exported.keys()
        for key in original:
            assert original[key].dtype == exported[key].dtype and torch.equal(original[key], exported[key]), key
        assert json.loads((hf / "config.json").read_text()) == json.loads((out / "config.json").read_text())
        assert (out / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"
        if name == "llama3":
            assert len(summary["files"]) > 1 and (out / "model.safetensors.index.json").is_file()
            assert torch.equal(hf_logits(out), hf_logits(hf))


def test_export_dtype_and_padded_tp2_import(models, tmp_path):
    root, paths = models
    out = tmp_path / "bf16"
    convert("export", "--megatron", str(root / "mistral-tp2"), "--out", str(out), "--dtype", "bf16")
    exported = load_file(out / "model.safetensors")
    original = load_file(paths["mistral"] / "model.safetensors")
    assert exported["lm_head.weight"].shape == (VOCAB, 64)  # the 1280-row TP2 padding is removed
    for key in original:
        assert exported[key].dtype == torch.bfloat16
        assert torch.equal(exported[key], original[key].to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _assert_refused(result, *phrases, out):
    assert result.returncode == 2, result.stderr[-2000:]
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr[-2000:]
    assert not out.exists() and not out.with_name(f".{out.name}.partial").exists()


@pytest.mark.one_leg
def test_bad_inputs_are_refused_without_partial_output(models, tmp_path):
    root, paths = models
    out = tmp_path / "out"
    _assert_refused(convert("import", "--hf", str(paths["mistral"]), "--out", str(out), "--tp", "3", check=False),
                    "num_attention_heads 8 is not divisible by tensor_parallel_degree 3", out=out)

    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((paths["mistral"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    _assert_refused(convert("import", "--hf", str(bad), "--out", str(out), check=False),
                    "model_type 'gpt2' is not supported", out=out)

    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    (bad / "model.safetensors").write_bytes((paths["mistral"] / "model.safetensors").read_bytes())
    _assert_refused(convert("import", "--hf", str(bad), "--out", str(out), check=False),
                    "model.layers.0.mlp.down_proj.weight has shape [64, 96]", "implies [64, 128]", out=out)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for file in paths["llama3"].iterdir():
        (sharded / file.name).write_bytes(file.read_bytes())
    missing = sorted(sharded.glob("model-*.safetensors"))[-1]
    missing.unlink()
    _assert_refused(convert("import", "--hf", str(sharded), "--out", str(out), check=False),
                    f"missing: {missing.name}", out=out)

    (bad / "config.json").write_text(json.dumps(config))
    data = (paths["mistral"] / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-1000])
    _assert_refused(convert("import", "--hf", str(bad), "--out", str(out), check=False), "truncated", out=out)

    _assert_refused(convert("export", "--megatron", str(bad), "--out", str(out), check=False),
                    "is not a megatron-prm checkpoint", out=out)


def test_failure_while_writing_leaves_no_output(tmp_path):
    from megatron_prm.conversion.staging import staged_output

    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staged_output(final) as staging:
            (staging / "half-written").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with staged_output(final) as staging:
        (staging / "complete").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "complete").is_file()


# Tiny models with the Mistral vocabulary for the import -> train -> export -> score chain, per family
# (Qwen2 runs the same chain with its own tokenizer and an added step tag in tests/test_qwen_prm.py).
_TRAINED_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
TRAINED_FAMILIES = {
    "llama3": lambda vocab: LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **_TRAINED_SHAPE, rope_theta=500000.0)),
    "qwen3": lambda vocab: Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, **_TRAINED_SHAPE, head_dim=16,
                                                        rope_theta=1000000.0)),
}


@pytest.mark.parametrize("family", [pytest.param("llama3", marks=pytest.mark.one_leg), "qwen3"])
def test_exported_prm_scores_like_the_project_scorer(tmp_path, mistral_tokenizer, family):
    """Import a tiny model of ``family`` with the Mistral vocabulary, train a PRM briefly, export it, and
    compare transformers' P(+) at every placeholder with ``megatron-prm score``."""
    from megatron_prm.data.samples import SampleBuilder, SampleOptions
    from megatron_prm.data.records import validate_record
    from megatron_prm.data.synthetic import write_dataset
    from megatron_prm.tokenizer import special_token_ids

    torch.manual_seed(0)
    hf = tmp_path / "hf"
    _randomize_small_weights(TRAINED_FAMILIES[family](mistral_tokenizer.vocab_size)).save_pretrained(hf)
    convert("import", "--hf", str(hf), "--out", str(tmp_path / "base"))
    train = write_dataset(tmp_path / "train.jsonl", 64, seed=1)
    dev = write_dataset(tmp_path / "dev.jsonl", 12, seed=2)
    run_cli(["train", "--model_name_or_path", str(tmp_path / "base"), "--tokenizer_name_or_path", MISTRAL,
             "--train_dataset_path", str(train), "--output_dir", str(tmp_path / "run"), "--device", "cpu",
             "--bf16", "false", "--max_seq_len", "256", "--max_prompt_len", "128", "--learning_rate", "3e-3",
             "--warmup_steps", "0", "--max_steps", "4", "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "1", "--do_eval", "false"])
    convert("export", "--megatron", str(tmp_path / "run"), "--out", str(tmp_path / "exported"))
    run_cli(["score", "--checkpoint", str(tmp_path / "run"), "--data", str(dev), "--output", str(tmp_path / "s.jsonl")])
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32)
    special = special_token_ids(mistral_tokenizer, "ки", ["+", "-"])
    builder = SampleBuilder(mistral_tokenizer, special, SampleOptions(256, 128))
    raw = [json.loads(line) for line in dev.read_text().splitlines()]
    compared = 0
    for index, (record, scores) in enumerate(zip(raw, scored)):
        sample = builder.build(validate_record(record, path=dev, index=index, line=None, reward_tokens=("+", "-")))
        with torch.no_grad():
            logits = model(torch.tensor(sample.input_ids[None], dtype=torch.long)).logits[0]
        pair = logits[torch.tensor(sample.label_positions, dtype=torch.long)][:, [special.good, special.bad]]
        p_good = torch.softmax(pair, dim=-1)[:, 0]
        assert torch.allclose(p_good, torch.tensor(scores["step_scores"]), atol=1e-4, rtol=0), index
        compared += len(p_good)
    assert compared > 30
