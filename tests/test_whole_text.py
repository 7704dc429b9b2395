"""Tokenization whole_text: the ids that training and `score` use are the tokenizer applied to the rendered
text (what a serving engine sent that text tokenizes), with the real Mistral SentencePiece model and a
byte-level BPE tokenizer with Qwen2.5-Math-PRM's special `<extra_0>` tag; tags that do not come out as one
id each are refused or counted; the store and the run record the mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MISTRAL, write_jsonl
from megatron_prm.config import ConfigError, load_config
from megatron_prm.conversion.serving import export_scoring_settings
from megatron_prm.data.pipeline import tokenize_job, with_tokenization
from megatron_prm.data.preprocess import RecordTokenizer, preprocess, store_identity
from megatron_prm.data.records import RecordError, validate_record
from megatron_prm.data.samples import SampleBuilder, SampleOptions, load_samples
from megatron_prm.data.store import StoreError, TokenStore
from megatron_prm.data.store_cache import cached_store_prefix
from megatron_prm.data.whole_text import StepTagError, render, tag_spelling
from megatron_prm.tokenizer import load_tokenizer, special_token_ids
from qwen_fixtures import write_qwen2_tokenizer

REWARD = ("+", "-")
RECORDS = [
    {"src": "A colony starts with 7 bacteria and triples every hour. How many after 2 hours?", "tgt": [],
     "responses": ["7 × 3 = 21", "21 × 3 = 63", "The answer is 63."], "labels": ["+", "+", "-"]},
    {"src": ["Hi.", "Now: 2 + 2?"], "tgt": ["Hello."], "responses": ["2 + 2 = 4.", "So 4."], "labels": [1, 0.5]},
]


def _record(raw, index=0):
    return validate_record(raw, path="mem.jsonl", index=index, line=index + 1, reward_tokens=REWARD)


def _build(tokenizer, special, raw, tokenization="whole_text", **options):
    builder = SampleBuilder(tokenizer, special, SampleOptions(options.pop("max_seq_len", 512),
                                                              options.pop("max_prompt_len", 256),
                                                              tokenization=tokenization, **options))
    return builder.build(_record(raw), "mem.jsonl"), builder


@pytest.fixture(scope="module")
def mistral_special(mistral_tokenizer):
    return special_token_ids(mistral_tokenizer, "ки", ["+", "-"])


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    directory = write_qwen2_tokenizer(tmp_path_factory.mktemp("qwen_tok"), extra_special=("<extra_0>",), chat=True)
    return load_tokenizer(str(directory))


def test_mistral_ids_are_the_tokenizer_applied_to_the_rendered_text(mistral_tokenizer, mistral_special):
    # Its one-id piece is "▁ки"; glued to a step, "21ки", the same letters are id 1107.
    assert tag_spelling(mistral_tokenizer, "ки", 12902) == " ки"
    for raw in RECORDS:
        sample, _ = _build(mistral_tokenizer, mistral_special, raw)
        text = render(_record(raw), " ки", None).text
        assert sample.input_ids.tolist() == [1, *mistral_tokenizer.encode(text)]
        assert sample.label_positions.tolist() == np.flatnonzero(sample.input_ids == 12902).tolist()
        assert len(sample.label_positions) == len(raw["responses"])
    assert render(_record(RECORDS[1]), " ки", None).text == "Hi.\nHello.\nNow: 2 + 2?\n2 + 2 = 4. киSo 4. ки"


def test_qwen_chat_ids_are_the_model_card_rendering(qwen_tokenizer):
    """Qwen2.5-Math-PRM's recipe: the conversation rendered by the chat template with the steps, each
    ended by <extra_0>, as the assistant's content, tokenized whole."""
    special = special_token_ids(qwen_tokenizer, "<extra_0>", ["Step", "answer"])
    raw = RECORDS[0]
    sample, _ = _build(qwen_tokenizer, special, raw, apply_chat_template=True, system_prompt="Reason.")
    messages = [{"role": "system", "content": "Reason."}, {"role": "user", "content": raw["src"]},
                {"role": "assistant", "content": "".join(step + "<extra_0>" for step in raw["responses"])}]
    rendered = qwen_tokenizer._tok.apply_chat_template(messages, tokenize=False)
    card_ids = qwen_tokenizer._tok(rendered)["input_ids"]
    assert sample.input_ids.tolist() == card_ids[:len(sample)]  # what follows the last tag is the turn's end
    assert card_ids[len(sample):] == qwen_tokenizer.encode("<|im_end|>\n")
    assert sample.label_positions.tolist() == [i for i, t in enumerate(card_ids) if t == special.placeholder]
    # A plain prompt: no BOS in this vocabulary, the prompt then a newline, then the steps.
    plain, _ = _build(qwen_tokenizer, special, raw)
    text = render(_record(raw), "<extra_0>", None).text
    assert plain.input_ids.tolist() == qwen_tokenizer._tok(text)["input_ids"]


def test_whole_text_truncates_whole_steps_and_keeps_the_prompt_end(mistral_tokenizer, mistral_special):
    full, _ = _build(mistral_tokenizer, mistral_special, RECORDS[0])
    prompt_len = int(full.label_positions[0]) - 8  # "7 × 3 = 21 ки" is 9 ids after the prompt
    two_steps = int(full.label_positions[1]) + 1 - prompt_len
    cut, builder = _build(mistral_tokenizer, mistral_special, RECORDS[0], max_seq_len=8 + two_steps + 3,
                          max_prompt_len=8)
    assert full.input_ids[prompt_len:prompt_len + 9].tolist() == mistral_tokenizer.encode("7 × 3 = 21 ки")[1:]
    assert cut.input_ids.tolist() == [1, *full.input_ids[prompt_len - 7:int(full.label_positions[1]) + 1].tolist()]
    assert cut.label_values.tolist() == [1.0, 1.0]
    assert builder.report.reasons == {"prompt truncated": 1, "steps dropped to fit max_seq_len": 1}


def test_a_tag_that_merges_or_a_tag_in_the_text_is_refused_or_counted(tmp_path, mistral_tokenizer, mistral_special):
    merged = {"src": "q", "responses": ["a", "й b"], "labels": ["+", "+"]}  # "a кий": "▁", "кий", no "▁ки"
    with pytest.raises(StepTagError, match=r"record 0, field 'responses\[0\]': its step tag does not tokenize to "
                                           r"the step-tag id 12902 in the whole text.*1 tag ids for 2 steps"):
        _build(mistral_tokenizer, mistral_special, merged)
    assert _build(mistral_tokenizer, mistral_special, merged, tokenization="per_step")[0] is not None
    extra = {"src": "q ки here", "responses": ["a"], "labels": ["+"]}
    with pytest.raises(RecordError, match="field 'src/tgt': contains the placeholder token"):
        _build(mistral_tokenizer, mistral_special, extra)
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], merged, extra, RECORDS[1]])
    options = SampleOptions(512, 256, tokenization="whole_text")
    samples, report = load_samples(path, mistral_tokenizer, mistral_special, options, REWARD, skip_invalid=True,
                                   show_progress=False)
    assert [s.record_index for s in samples] == [0, 3]
    assert report.invalid == 2 and report.reasons == {"step tags not one id each in the whole text": 2}


def _job(data, tokenization):
    config = load_config(None, ["--tokenizer_name_or_path", MISTRAL, "--max_seq_len", "256",
                                "--tokenization", tokenization])
    return tokenize_job(config, str(data))


def test_the_store_records_its_mode_and_is_not_reused_for_the_other(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    whole, per_step = _job(data, "whole_text"), _job(data, "per_step")
    tokenizer = RecordTokenizer(whole)
    preprocess(per_step, tmp_path / "old", show_progress=False)
    store = TokenStore(tmp_path / "old")
    assert store.meta["identity"]["tokenization"] == "per_step"
    with pytest.raises(StoreError, match="tokenization: store has 'per_step', run asks for 'whole_text'"):
        store.check_matches(store_identity(tokenizer.tokenizer, tokenizer.special, whole))
    assert cached_store_prefix(whole, tokenizer, tmp_path) != cached_store_prefix(per_step, tokenizer, tmp_path)
    # A store written before the key existed was built per step.
    meta = json.loads((tmp_path / "old.meta.json").read_text())
    del meta["identity"]["tokenization"]
    (tmp_path / "old.meta.json").write_text(json.dumps(meta))
    assert TokenStore(tmp_path / "old").identity.tokenization == "per_step"
    # What `score` tokenizes into its store is the tokenizer applied to the rendered text.
    preprocess(whole, tmp_path / "new", show_progress=False)
    first = TokenStore(tmp_path / "new")[0]
    text = render(_record(RECORDS[0]), " ки", None).text
    assert first.input_ids.tolist() == [1, *tokenizer.tokenizer.encode(text)]


def _checkpoint(directory, run_config):
    directory.mkdir(parents=True)
    for name in (".metadata", "model_config.json"):
        (directory / name).write_text("{}")
    if run_config is not None:
        (directory / "run_config.json").write_text(json.dumps(run_config))
    return str(directory)


def test_a_resumed_run_keeps_its_checkpoints_mode(tmp_path):
    fresh = load_config(None, [])
    assert fresh.data.tokenization is None and with_tokenization(fresh, None).data.tokenization == "per_step"
    asked = load_config(None, ["--tokenization", "whole_text"])
    assert with_tokenization(asked, None).data.tokenization == "whole_text"
    old = _checkpoint(tmp_path / "old", {"max_seq_len": 4096})
    assert with_tokenization(fresh, old).data.tokenization == "per_step"
    new = _checkpoint(tmp_path / "new", {"tokenization": "whole_text"})
    assert with_tokenization(fresh, new).data.tokenization == "whole_text"
    with pytest.raises(ConfigError, match="tokenization 'whole_text': the checkpoint resumed from .* was trained "
                                          "with 'per_step'; a resume keeps it"):
        with_tokenization(asked, old)
    with pytest.raises(ConfigError, match="tokenization must be one of whole_text, per_step"):
        load_config(None, ["--tokenization", "whole"])


def test_an_export_scores_with_its_runs_mode(tmp_path):
    (tmp_path / "prm_serving.json").write_text(json.dumps({
        "export_kind": "causal-lm", "architecture": "MistralForCausalLM", "dtype": "float32", "step_tag": "ки",
        "step_tag_id": 12902, "reward_tokens": ["+", "-"], "reward_token_ids": [648, 387],
        "reward_token_pieces": ["▁+", "▁-"], "output_classes": ["good", "bad"], "p_good_column": 0,
        "vllm_version": "0.32.0", "vllm_command": "vllm serve x"}))
    assert "--tokenization=per_step" in export_scoring_settings(tmp_path, {})  # written before the field
