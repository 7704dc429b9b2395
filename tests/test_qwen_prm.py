"""Qwen-family PRMs end to end: a step tag the tokenizer lacks is added and travels with the checkpoint and
the export; the token-classifier export scores like ``megatron-prm score``; Qwen2.5-Math-PRM's MLP head
(``reward_head: mlp``) imports, exports bitwise, scores under TP2 like its plain-torch reference and trains;
every kind of export scores through ``score --hf`` like its checkpoint and describes how to serve it."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_log, run_cli
from qwen_fixtures import qwen2_prm_reference, write_qwen2_prm, write_qwen2_tokenizer
from test_convert_hf import convert

pytest.importorskip("transformers")
from transformers import AutoModelForTokenClassification, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from megatron_prm.data.convert import convert_file  # noqa: E402
from megatron_prm.data.records import validate_record  # noqa: E402
from megatron_prm.data.samples import SampleBuilder, SampleOptions  # noqa: E402
from megatron_prm.tokenizer import load_tokenizer, special_token_ids  # noqa: E402

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.05)
STEP_TAG = "<extra_0>"
LENGTHS = ["--max_seq_len", "768", "--max_prompt_len", "256"]
TRAIN = ["--device", "cpu", "--bf16", "false", "--learning_rate", "1e-3", "--warmup_steps", "0", "--max_steps", "2",
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--do_eval", "false", *LENGTHS]


def load_safetensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in directory.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def assert_serving_matches_tokenizer(directory, kind: str, step_tag: str = STEP_TAG) -> dict:
    """The export's prm_serving.json agrees with its own tokenizer and config, and its vLLM command is built
    from those values."""
    from transformers import AutoTokenizer

    serving = json.loads((directory / "prm_serving.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    config = json.loads((directory / "config.json").read_text())
    assert serving["export_kind"] == kind and serving["architecture"] == config["architectures"][0]
    assert serving["step_tag"] == step_tag and serving["step_tag_id"] == tokenizer.convert_tokens_to_ids(step_tag)
    assert serving["dtype"] == config.get("dtype", config.get("torch_dtype")) == "float32"
    assert f'"step_tag_id": {serving["step_tag_id"]}' in serving["vllm_command"]
    assert "--dtype float32" in serving["vllm_command"] and serving["vllm_version"] == "0.32.0"
    if kind == "mlp-head":
        assert serving["reward_token_ids"] is None and serving["output_classes"] == ["bad", "good"]
        assert serving["p_good_column"] == 1
        return serving
    assert serving["output_classes"] == ["good", "bad"] and serving["p_good_column"] == 0
    ids, pieces = serving["reward_token_ids"], serving["reward_token_pieces"]
    assert pieces == tokenizer.convert_ids_to_tokens(ids) and tokenizer.convert_tokens_to_ids(pieces) == ids
    assert ids == [tokenizer.encode(token, add_special_tokens=False)[0] for token in serving["reward_tokens"]]
    if kind == "causal-lm":
        assert "--convert classify" in serving["vllm_command"]
        assert json.dumps({"classifier_from_token": pieces}, ensure_ascii=False)[1:-1] in serving["vllm_command"]
    return serving


def samples_of(records_path, tokenizer_dir, reward_tokens=("+", "-")):
    """(record, input ids [1, s], step-tag positions) as the project's data pipeline builds them."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    special = special_token_ids(tokenizer, STEP_TAG, list(reward_tokens), add_missing=False)
    builder = SampleBuilder(tokenizer, special, SampleOptions(768, 256))
    for index, line in enumerate(records_path.read_text().splitlines()):
        sample = builder.build(validate_record(json.loads(line), path=records_path, index=index, line=None,
                                               reward_tokens=reward_tokens))
        yield (index, torch.tensor(sample.input_ids[None], dtype=torch.long),
               torch.tensor(sample.label_positions, dtype=torch.long))


@pytest.fixture
def processbench_records(shared_data, tmp_path):
    """The first 8 ProcessBench GSM8K items as records (labels from the first-error index)."""
    source = tmp_path / "pb.json"
    with gzip.open(shared_data / "processbench" / "gsm8k.json.gz", "rt", encoding="utf-8") as handle:
        source.write_text(json.dumps(json.load(handle)[:8]))
    out = tmp_path / "pb.jsonl"
    convert_file("processbench", source, out, show_progress=False)
    return out


@pytest.mark.one_leg
def test_added_step_tag_travels_and_token_classifier_scores_like_the_scorer(tmp_path, processbench_records):
    """The added <extra_0> travels with the checkpoint into both exports; each export's prm_serving.json
    agrees with its tokenizer; the token classifier scores like the checkpoint in transformers and through
    ``score --hf``, and is refused by ``convert-hf import``."""
    tokenizer_dir = write_qwen2_tokenizer(tmp_path / "tokenizer")
    vocab = load_tokenizer(str(tokenizer_dir)).vocab_size  # <extra_0> is not among them
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **SHAPE)).save_pretrained(hf)
    for file in tokenizer_dir.iterdir():
        shutil.copy2(file, hf / file.name)
    convert("import", "--hf", str(hf), "--out", str(tmp_path / "base"))
    run_cli(["train", "--model_name_or_path", str(tmp_path / "base"), "--placeholder_token", STEP_TAG,
             "--train_dataset_path", str(processbench_records), "--output_dir", str(tmp_path / "run"), *TRAIN])
    assert all(event["loss"] > 0 for event in read_log(tmp_path / "run", "train"))

    # The tag was added as id `vocab`; the checkpoint's tokenizer and model config carry it.
    checkpoint = tmp_path / "run" / (tmp_path / "run" / "latest").read_text().strip()
    assert special_token_ids(load_tokenizer(str(checkpoint / "tokenizer")), STEP_TAG, ["+", "-"],
                             add_missing=False).placeholder == vocab
    assert json.loads((checkpoint / "model_config.json").read_text())["vocab_size"] == vocab + 1

    run_cli(["score", "--checkpoint", str(tmp_path / "run"), "--data", str(processbench_records),
             "--output", str(tmp_path / "scores.jsonl")])
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    convert("export", "--megatron", str(tmp_path / "run"), "--out", str(tmp_path / "lm"))
    summary = json.loads(convert("export", "--megatron", str(tmp_path / "run"), "--out", str(tmp_path / "tc"),
                                 "--as", "token-classifier").stdout)
    assert summary["step_tag_id"] == vocab and summary["architecture"] == "Qwen2ForTokenClassification"

    lm, tc = load_safetensors(tmp_path / "lm"), load_safetensors(tmp_path / "tc")
    assert lm["model.embed_tokens.weight"].shape == (vocab + 1, SHAPE["hidden_size"])
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["vocab_size"] == vocab + 1
    good, bad = summary["reward_token_ids"]
    assert torch.equal(tc["score.weight"], lm["model.embed_tokens.weight"][[good, bad]])  # tied: the embedding rows
    assert torch.equal(tc["score.bias"], torch.zeros(2)) and "lm_head.weight" not in tc

    assert_serving_matches_tokenizer(tmp_path / "lm", "causal-lm")
    assert assert_serving_matches_tokenizer(tmp_path / "tc", "token-classifier")["reward_token_ids"] == [good, bad]

    # score --hf reads the token classifier back (its step tag and reward tokens from prm_serving.json).
    run_cli(["score", "--hf", str(tmp_path / "tc"), "--data", str(processbench_records),
             "--output", str(tmp_path / "tc_scores.jsonl"), *LENGTHS])
    from_tc = [json.loads(line) for line in (tmp_path / "tc_scores.jsonl").read_text().splitlines()]
    assert [r["num_steps"] for r in from_tc] == [r["num_steps"] for r in scored]
    for ours, theirs in zip(from_tc, scored):
        assert len(ours["step_scores"]) == len(theirs["step_scores"]) > 0
        assert torch.allclose(torch.tensor(ours["step_scores"]), torch.tensor(theirs["step_scores"]), atol=1e-5, rtol=0)

    refused = convert("import", "--hf", str(tmp_path / "tc"), "--out", str(tmp_path / "tc-imported"), check=False)
    assert refused.returncode == 2 and "is read only by `megatron-prm score --hf`" in refused.stderr

    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "tc", dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2ForTokenClassification" and model.config.id2label == {0: "good", 1: "bad"}
    compared = 0
    for index, input_ids, positions in samples_of(processbench_records, tmp_path / "tc"):
        with torch.no_grad():
            p_good = torch.softmax(model(input_ids).logits[0, positions], dim=-1)[:, 0]
        assert torch.allclose(p_good, torch.tensor(scored[index]["step_scores"]), atol=1e-4, rtol=0), index
        compared += len(p_good)
    assert compared >= 20  # some steps of these long solutions fall beyond max_seq_len


@pytest.fixture(scope="module")
def mlp_prm(tmp_path_factory):
    """A Qwen2.5-Math-PRM-style checkpoint (its tokenizer holds <extra_0> and a ChatML template) and its
    import."""
    root = tmp_path_factory.mktemp("mlp")
    tokenizer_dir = write_qwen2_tokenizer(root / "tokenizer", extra_special=(STEP_TAG,), chat=True)
    torch.manual_seed(0)
    hf = write_qwen2_prm(root / "hf", load_tokenizer(str(tokenizer_dir)).vocab_size, **SHAPE)
    for file in tokenizer_dir.iterdir():
        shutil.copy2(file, hf / file.name)
    convert("import", "--hf", str(hf), "--out", str(root / "imported"))
    return root, hf


def test_mlp_head_round_trip_is_bitwise(mlp_prm, tmp_path):
    root, hf = mlp_prm
    exported_run = convert("export", "--megatron", str(root / "imported"), "--out", str(tmp_path / "out"))
    original, exported = load_safetensors(hf), load_safetensors(tmp_path / "out")
    assert original.keys() == exported.keys() and "score.2.weight" in exported and "lm_head.weight" not in exported
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    assert json.loads((hf / "config.json").read_text()) == json.loads((tmp_path / "out" / "config.json").read_text())
    # Imported without run settings, the default step tag is not one token of this tokenizer: no serving file.
    assert "no prm_serving.json" in exported_run.stderr and not (tmp_path / "out" / "prm_serving.json").exists()
    refused = convert("export", "--megatron", str(root / "imported"), "--out", str(tmp_path / "tc"),
                      "--as", "token-classifier", check=False)
    assert refused.returncode == 2 and "MLP reward head" in refused.stderr and not (tmp_path / "tc").exists()


def test_mlp_head_scores_like_its_reference_under_tp2_and_trains(mlp_prm, tmp_path):
    from megatron_prm.data.synthetic import write_dataset

    root, hf = mlp_prm
    records = write_dataset(tmp_path / "records.jsonl", 6, seed=3)
    run_cli(["score", "--checkpoint", str(root / "imported"), "--data", str(records), "--output",
             str(tmp_path / "scores.jsonl"), "--placeholder_token", STEP_TAG, "--tensor_parallel_degree", "2",
             "--bf16", "false", *LENGTHS], nproc=2)
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    base, score = qwen2_prm_reference(hf)
    compared = 0
    for index, input_ids, positions in samples_of(records, hf):
        with torch.no_grad():
            hidden = base(input_ids).last_hidden_state[0, positions]
            p_good = torch.softmax(score(hidden), dim=-1)[:, 1]  # Qwen2.5-Math-PRM: column 1 is the good class
        assert torch.allclose(p_good, torch.tensor(scored[index]["step_scores"]), atol=1e-4, rtol=0), index
        compared += len(p_good)
    assert compared >= 10

    # Its export (the step tag given: the imported checkpoint has no run settings) scores through score --hf
    # like the checkpoint.
    convert("export", "--megatron", str(root / "imported"), "--out", str(tmp_path / "mlp"), "--step-tag", STEP_TAG)
    assert_serving_matches_tokenizer(tmp_path / "mlp", "mlp-head")
    run_cli(["score", "--hf", str(tmp_path / "mlp"), "--data", str(records), "--output",
             str(tmp_path / "mlp_scores.jsonl"), *LENGTHS])
    from_export = [json.loads(line) for line in (tmp_path / "mlp_scores.jsonl").read_text().splitlines()]
    for ours, theirs in zip(from_export, scored, strict=True):
        assert len(ours["step_scores"]) == len(theirs["step_scores"]) > 0
        assert torch.allclose(torch.tensor(ours["step_scores"]), torch.tensor(theirs["step_scores"]), atol=1e-5, rtol=0)

    run_cli(["train", "--model_name_or_path", str(root / "imported"), "--reward_head", "mlp",
             "--placeholder_token", STEP_TAG, "--train_dataset_path", str(records),
             "--output_dir", str(tmp_path / "run"), *TRAIN])
    losses = [event["loss"] for event in read_log(tmp_path / "run", "train")]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    convert("export", "--megatron", str(tmp_path / "run"), "--out", str(tmp_path / "trained"))
    trained, original = load_safetensors(tmp_path / "trained"), load_safetensors(hf)
    assert not torch.equal(trained["score.0.weight"], original["score.0.weight"])  # the head was trained
    assert_serving_matches_tokenizer(tmp_path / "trained", "mlp-head")  # the step tag from the run's settings


def test_mlp_head_starts_fresh_from_a_causal_lm(tmp_path):
    """``reward_head: mlp`` from a causal LM (no ``score`` weights): the decoder loads, the head starts from
    its own initialisation, trains, and exports in the published layout."""
    from megatron_prm.data.synthetic import write_dataset

    torch.manual_seed(0)
    hf = tmp_path / "hf"
    write_qwen2_tokenizer(hf, extra_special=(STEP_TAG,))
    vocab = load_tokenizer(str(hf)).vocab_size
    Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **SHAPE, tie_word_embeddings=True)).save_pretrained(hf)
    convert("import", "--hf", str(hf), "--out", str(tmp_path / "imported"))
    records = write_dataset(tmp_path / "records.jsonl", 8, seed=4)
    run_cli(["train", "--model_name_or_path", str(tmp_path / "imported"), "--reward_head", "mlp",
             "--placeholder_token", STEP_TAG, "--train_dataset_path", str(records),
             "--output_dir", str(tmp_path / "run"), *TRAIN])
    losses = [event["loss"] for event in read_log(tmp_path / "run", "train")]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    convert("export", "--megatron", str(tmp_path / "run"), "--out", str(tmp_path / "exported"))
    exported, original = load_safetensors(tmp_path / "exported"), load_safetensors(hf)
    assert exported["score.0.weight"].shape == (SHAPE["hidden_size"],) * 2 and exported["score.2.weight"].shape[0] == 2
    assert torch.isfinite(exported["score.0.weight"]).all() and exported["score.0.weight"].abs().sum() > 0
    assert not torch.equal(exported["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])


def test_a_published_chat_prm_scores_as_its_model_card_says(mlp_prm, processbench_records, tmp_path):
    """``score --hf`` with ``apply_chat_template`` on a Qwen2.5-Math-PRM-style directory equals the model
    card's recipe: the conversation (system, user question, the steps joined and ended by <extra_0> as the
    assistant turn) rendered by the tokenizer's chat template, tokenized whole, P(good) = softmax(score)[1]
    at each <extra_0>."""
    from transformers import AutoTokenizer

    _, hf = mlp_prm
    system = "Please reason step by step, and put your final answer within \\boxed{}."
    run_cli(["score", "--hf", str(hf), "--data", str(processbench_records), "--output", str(tmp_path / "chat.jsonl"),
             "--placeholder_token", STEP_TAG, "--apply_chat_template", "true", "--system_prompt", system,
             "--max_seq_len", "1024", "--max_prompt_len", "600"])  # prompts whole (the tiny vocabulary is verbose)
    scored = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    base, score = qwen2_prm_reference(hf)
    compared = 0
    for record, result in zip(map(json.loads, processbench_records.read_text().splitlines()), scored):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": record["src"]},
                    {"role": "assistant", "content": STEP_TAG.join(record["responses"]) + STEP_TAG}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        input_ids = tokenizer.encode(text, return_tensors="pt")
        with torch.no_grad():
            hidden = base(input_ids).last_hidden_state[0]
            p_good = torch.softmax(score(hidden[input_ids[0] == tokenizer.convert_tokens_to_ids(STEP_TAG)]), -1)[:, 1]
        ours = torch.tensor(result["step_scores"])
        assert result["num_steps"] == len(p_good) >= len(ours) >= 1, result["index"]
        assert torch.allclose(p_good[:len(ours)], ours, atol=1e-4, rtol=0), result["index"]
        compared += len(ours)
    assert compared >= 20

    plain = run_cli(["score", "--hf", str(hf), "--data", str(processbench_records), "--output",
                     str(tmp_path / "plain.jsonl"), "--placeholder_token", STEP_TAG, "--system_prompt", system,
                     *LENGTHS], check=False)
    assert plain.returncode == 2 and "system_prompt is used only with apply_chat_template" in plain.stderr
    assert not (tmp_path / "plain.jsonl").exists()


def test_a_chat_prompt_needs_a_tokenizer_with_a_chat_template(tmp_path, mistral_tokenizer):
    from megatron_prm.tokenizer import TokenizerError

    options = SampleOptions(768, 256, apply_chat_template=True)
    with pytest.raises(TokenizerError, match="needs a Hugging Face tokenizer with a chat template"):
        SampleBuilder(mistral_tokenizer, special_token_ids(mistral_tokenizer, "ки", ["+", "-"]), options)
    plain = load_tokenizer(str(write_qwen2_tokenizer(tmp_path / "plain", extra_special=(STEP_TAG,))))
    with pytest.raises(TokenizerError, match="plain has none"):
        SampleBuilder(plain, special_token_ids(plain, STEP_TAG, ["+", "-"]), options)


@pytest.mark.one_leg
def test_chat_prompts_in_check_data_and_stores(tmp_path):
    """check-data and preprocess take the chat options; a store records them and the template's digest, so a
    run asking for another system prompt or template is refused; a chat prompt is never cut (dropped)."""
    from megatron_prm.data.store import StoreError, TokenStore
    from megatron_prm.data.synthetic import write_dataset
    from megatron_prm.tokenizer import chat_template_digest

    tokenizer_dir = write_qwen2_tokenizer(tmp_path / "tokenizer", extra_special=(STEP_TAG,), chat=True)
    records = write_dataset(tmp_path / "records.jsonl", 6, seed=5)
    common = ["--data", str(records), "--tokenizer", str(tokenizer_dir), "--placeholder-token", STEP_TAG,
              "--max-seq-len", "768", "--apply-chat-template", "--system-prompt", "--Reason step by step."]
    prefix = tmp_path / "store"
    run_cli(["preprocess", *common, "--max-prompt-len", "256", "--output-prefix", str(prefix)])
    store = TokenStore(prefix)
    identity = store.identity
    assert identity.apply_chat_template and identity.system_prompt == "--Reason step by step."
    assert identity.chat_template_digest == chat_template_digest(load_tokenizer(str(tokenizer_dir)))
    assert len(store) == 6
    for change in ({"system_prompt": None}, {"chat_template_digest": "0" * 16}):
        with pytest.raises(StoreError, match=next(iter(change))):
            store.check_matches(dataclasses.replace(identity, **change))

    dropped = run_cli(["check-data", *common, "--max-prompt-len", "8"], check=False)
    assert dropped.returncode == 2 and "no usable record (6 read; 6 chat prompt longer than max_prompt_len)" in dropped.stderr
