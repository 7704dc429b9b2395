"""Records -> samples: token-level goldens with the real Mistral tokenizer, truncation, errors."""

import gzip
import json

import numpy as np
import pytest

from conftest import MISTRAL, run_cli, write_jsonl
from megatron_prm.data.records import RecordError, iter_raw_records, validate_record
from megatron_prm.data.samples import SampleBuilder, SampleOptions, load_samples
from megatron_prm.tokenizer import TokenizerError, load_tokenizer, special_token_ids

REWARD = ("+", "-")


@pytest.fixture(scope="module")
def special(mistral_tokenizer):
    return special_token_ids(mistral_tokenizer, "ки", ["+", "-"])


def build(tokenizer, special, raw, max_seq_len=4096, max_prompt_len=2048, process_reward=True,
          tokenization="per_step"):
    """The sample of ``raw``; per_step by default: these goldens spell out its id-level assembly (whole_text is
    tested in tests/test_whole_text.py)."""
    record = validate_record(raw, path="mem.jsonl", index=0, line=1, reward_tokens=REWARD)
    builder = SampleBuilder(tokenizer, special, SampleOptions(max_seq_len, max_prompt_len, process_reward,
                                                              tokenization=tokenization))
    return builder.build(record, "mem.jsonl"), builder.report


def test_mistral_special_token_goldens(mistral_tokenizer, special):
    assert (special.placeholder, special.good, special.bad) == (12902, 648, 387)
    assert mistral_tokenizer.encode(" ки") == [28705, 12902]  # why sequences are built from ids
    assert (mistral_tokenizer.bos_id, mistral_tokenizer.eos_id) == (1, 2)


def test_placeholder_that_is_not_one_token_is_refused(mistral_tokenizer):
    with pytest.raises(TokenizerError) as err:
        special_token_ids(mistral_tokenizer, "<step>", ["+", "-"])
    message = str(err.value)
    assert "placeholder_token '<step>'" in message and "pieces" in message and "exactly one token" in message
    with pytest.raises(TokenizerError, match="reward_tokens\\[0\\]"):
        special_token_ids(mistral_tokenizer, "ки", ["good answer", "-"])


def test_sample_ids_golden(mistral_tokenizer, special):
    sample, _ = build(mistral_tokenizer, special, {
        "src": "1+1?", "tgt": [], "responses": ["1 + 1 = 2", "The answer is 2."], "labels": ["+", "-"]})
    q = mistral_tokenizer.encode("1+1?")
    s1 = mistral_tokenizer.encode("1 + 1 = 2")
    s2 = mistral_tokenizer.encode("The answer is 2.")
    assert sample.input_ids.tolist() == [1, *q, *s1, 12902, *s2, 12902]
    assert sample.label_positions.tolist() == [1 + len(q) + len(s1), 1 + len(q) + len(s1) + 1 + len(s2)]
    assert all(sample.input_ids[p] == 12902 for p in sample.label_positions)
    assert sample.label_values.tolist() == [1.0, 0.0]


def test_multi_turn_history_in_order(mistral_tokenizer, special):
    raw = {"src": ["u1", "u2", "u3"], "tgt": ["a1", "a2"], "responses": ["s"], "labels": ["+"]}
    sample, _ = build(mistral_tokenizer, special, raw)
    enc = mistral_tokenizer.encode
    expected = [1, *enc("u1"), *enc("a1"), 2, *enc("u2"), *enc("a2"), 2, *enc("u3"), *enc("s"), 12902]
    assert sample.input_ids.tolist() == expected


def test_soft_labels_are_floats(mistral_tokenizer, special):
    sample, _ = build(mistral_tokenizer, special, {"src": "q", "responses": ["a", "b", "c"], "labels": [0.25, 1, "-"]})
    assert sample.label_values.dtype == np.float32
    assert sample.label_values.tolist() == [0.25, 1.0, 0.0]


@pytest.mark.parametrize("tokenization", ["per_step", "whole_text"])
def test_truncation_drops_whole_trailing_steps_with_their_labels(mistral_tokenizer, special, tokenization):
    steps = [f"Step {i}: {i} + {i} = {2 * i}" for i in range(1, 9)]
    labels = ["+", "+", "-", "+", "-", "-", "+", "-"]
    raw = {"src": "Add things.", "responses": steps, "labels": labels}
    full, _ = build(mistral_tokenizer, special, raw, tokenization=tokenization)
    cut = int(full.label_positions[3]) + 1 + 3  # room for four steps and a bit, not five
    sample, report = build(mistral_tokenizer, special, raw, max_seq_len=cut, max_prompt_len=16,
                           tokenization=tokenization)
    assert len(sample.label_positions) == 4
    assert sample.input_ids.tolist() == full.input_ids[:int(full.label_positions[3]) + 1].tolist()
    assert sample.label_positions.tolist() == full.label_positions[:4].tolist()
    assert sample.label_values.tolist() == [1.0, 1.0, 0.0, 1.0]  # each label still on its own step
    assert report.truncated == 1 and report.reasons["steps dropped to fit max_seq_len"] == 1


def test_long_prompt_keeps_its_end(mistral_tokenizer, special):
    prompt = " ".join(f"w{i}" for i in range(200))
    sample, report = build(mistral_tokenizer, special, {"src": prompt, "responses": ["x"], "labels": ["+"]},
                           max_seq_len=64, max_prompt_len=20)
    prompt_ids = mistral_tokenizer.encode(prompt)
    assert sample.input_ids[:20].tolist() == [1, *prompt_ids[-19:]]
    assert sample.label_positions.tolist() == [20 + len(mistral_tokenizer.encode("x"))]
    assert report.reasons["prompt truncated"] == 1


def test_record_without_a_fitting_step_is_dropped_and_counted(mistral_tokenizer, special):
    sample, report = build(mistral_tokenizer, special, {"src": "q", "responses": ["word " * 50], "labels": ["+"]},
                           max_seq_len=16, max_prompt_len=8)
    assert sample is None and report.dropped == 1


def test_orm_mode_keeps_only_the_last_step(mistral_tokenizer, special):
    raw = {"src": "q", "responses": ["a", "b", "c"], "labels": ["+", "+", "-"]}
    sample, _ = build(mistral_tokenizer, special, raw, process_reward=False)
    prm, _ = build(mistral_tokenizer, special, raw)
    assert sample.label_positions.tolist() == prm.label_positions[-1:].tolist()
    assert sample.label_values.tolist() == [0.0]
    # The outcome label sits on the last step; if that step does not fit, the record is dropped.
    cut, report = build(mistral_tokenizer, special, raw, max_seq_len=int(prm.label_positions[1]) + 2,
                        max_prompt_len=2, process_reward=False)
    assert cut is None and report.reasons["last step does not fit (ORM)"] == 1


@pytest.mark.parametrize("raw, field, problem", [
    ({"src": "q", "responses": ["a", "b"], "labels": ["+"]}, "labels", "1 labels for 2 steps"),
    ({"src": "q", "responses": ["a"], "labels": ["?"]}, "labels[0]", "must be '+', '-' or a number"),
    ({"src": "q", "responses": ["a"], "labels": [1.5]}, "labels[0]", "number in [0, 1]"),
    ({"src": ["q1", "q2"], "tgt": [], "responses": ["a"], "labels": ["+"]}, "tgt", "one more turn"),
    ({"src": 3, "responses": ["a"], "labels": ["+"]}, "src", "string or a list"),
    ({"responses": ["a"], "labels": ["+"]}, "src", "missing"),
    ({"src": "q", "responses": ["a", " "], "labels": ["+", "+"]}, "responses[1]", "empty"),
    ({"src": "q", "responses": ["a"]}, "labels", "missing"),
    (["not", "an", "object"], "<record>", "JSON object"),
])
def test_bad_records_name_file_record_and_field(tmp_path, mistral_tokenizer, special, raw, field, problem):
    good = {"src": "q", "responses": ["a"], "labels": ["+"]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, raw])
    options = SampleOptions(128, 64)
    with pytest.raises(RecordError) as err:
        load_samples(path, mistral_tokenizer, special, options, REWARD, show_progress=False)
    assert (err.value.path, err.value.index, err.value.field) == (str(path), 1, field)
    assert problem in str(err.value) and "line 2" in str(err.value)
    samples, report = load_samples(path, mistral_tokenizer, special, options, REWARD, skip_invalid=True,
                                   show_progress=False)
    assert len(samples) == 1 and report.invalid == 1 and report.records == 2


def test_placeholder_inside_a_step_is_an_error(tmp_path, mistral_tokenizer, special):
    path = write_jsonl(tmp_path / "d.jsonl", [{"src": "q", "responses": ["a ки b", "c"], "labels": ["+", "+"]}])
    with pytest.raises(RecordError, match="responses\\[0\\].*placeholder"):
        load_samples(path, mistral_tokenizer, special, SampleOptions(128, 64), REWARD, show_progress=False)


def test_json_array_gzip_and_malformed_lines(tmp_path):
    records = [{"src": "q", "responses": ["a"], "labels": ["+"]}] * 3
    array = tmp_path / "d.json.gz"
    with gzip.open(array, "wt") as handle:
        json.dump(records, handle)
    assert [index for index, _, _ in iter_raw_records(array)] == [0, 1, 2]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(records[0]) + "\n\n{oops\n")
    with pytest.raises(RecordError) as err:
        list(iter_raw_records(broken))
    assert err.value.index == 1 and "line 3" in str(err.value)


def test_hf_tokenizer_directory_matches_sentencepiece(tmp_path, mistral_tokenizer):
    from megatron_prm.tokenizer import resolve_tokenizer_path

    (tmp_path / "tokenizer.model").write_bytes(resolve_tokenizer_path(MISTRAL).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    hf = load_tokenizer(str(tmp_path))
    text = "Step 1: 12 + 7 = 19"
    assert hf.encode(text) == mistral_tokenizer.encode(text)
    assert special_token_ids(hf, "ки", ["+", "-"]).placeholder == 12902


def test_check_data_prints_json_summary(tmp_path):
    records = [
        {"src": "q", "responses": ["1 + 1 = 2", "2 + 2 = 5"], "labels": ["+", "-"]},
        {"src": "q", "responses": ["word " * 40, "b"], "labels": ["+", "+"]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    result = run_cli(["check-data", "--data", str(path), "--tokenizer", MISTRAL, "--max-seq-len", "24",
                      "--max-prompt-len", "8"])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["records"] == 2 and summary["kept"] == 1 and summary["dropped"] == 1
    assert summary["steps"] == 2 and summary["labelled_positions"] == 2 and summary["positive_share"] == 0.5
