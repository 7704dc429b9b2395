"""Bad input, second campaign (issue 27): no output ever destroys an input, every command ends bad input
with one line and exit status 2 (a traceback only with --debug), numeric options are range-checked from one
table, readers refuse what JSON can spell but the project cannot use."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest

from conftest import MISTRAL, REPO, write_jsonl
from megatron_prm import cli
from megatron_prm.data.records import RecordError, iter_raw_records, parse_label, validate_record
from megatron_prm.option_ranges import OPTION_RANGES, RangeChecked
from test_first_hour import COMMAND_LINES, _subparsers

GOOD = {"src": "1 + 1?", "responses": ["1 + 1 = 2"], "labels": ["+"]}
PROCESSBENCH = {"id": "x-0", "problem": "1 + 1?", "steps": ["1 + 1 = 2", "so 2"], "label": -1}


def main(args: list[str], capsys) -> tuple[int, str]:
    """``megatron-prm ARGS`` in this process: the exit status and stderr."""
    code = cli.main(args)
    return code, capsys.readouterr().err


def one_line(code: int, err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(*paths) -> dict:
    return {str(p): p.read_bytes() for p in paths}


# ------------------------------------------------------------------------------------------ data loss


def test_convert_data_never_writes_over_its_input(tmp_path, capsys):
    source = write_jsonl(tmp_path / "pb.jsonl", [PROCESSBENCH])
    before = snapshot(source)
    one_line(*main(["convert-data", "--from", "processbench", "--input", str(source), "--output", str(source)], capsys),
             "would overwrite the input")
    # The same file through another spelling, a symbolic link and a hard link.
    (tmp_path / "link.jsonl").symlink_to(source)
    os.link(source, tmp_path / "hard.jsonl")
    for other in (tmp_path / "." / "pb.jsonl", tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        one_line(*main(["convert-data", "--from", "processbench", "--input", str(source), "--output", str(other)],
                       capsys), "would overwrite the input")
    # The temporary file an output is written under may not be the input either.
    tmp_named = write_jsonl(tmp_path / "out.jsonl.tmp", [PROCESSBENCH])
    one_line(*main(["convert-data", "--from", "processbench", "--input", str(tmp_named), "--output",
                    str(tmp_path / "out.jsonl")], capsys), "would overwrite the input")
    assert snapshot(source) == before and not (tmp_path / "out.jsonl").exists()


def test_an_output_that_is_a_directory_or_under_a_file_is_one_line(tmp_path, capsys):
    source = write_jsonl(tmp_path / "pb.jsonl", [PROCESSBENCH])
    convert = ["convert-data", "--from", "processbench", "--input", str(source), "--output"]
    one_line(*main([*convert, str(tmp_path)], capsys), "is a directory")
    one_line(*main([*convert, str(source / "x.jsonl")], capsys), "is a file, not a directory")
    one_line(*main(["demo", "--output-dir", str(source / "demo")], capsys), "is a file, not a directory")
    one_line(*main(["demo", "--output-dir", str(source)], capsys), "is a file, not a directory")
    one_line(*main(["score", "--checkpoint", str(tmp_path), "--data", str(source), "--output", str(tmp_path)], capsys),
             "--output", "is a directory")
    one_line(*main(["score", "--checkpoint", str(tmp_path), "--data", str(source), "--output", str(source)], capsys),
             "would overwrite the input")
    # An output inside the checkpoint it reads would change that sealed checkpoint; one replacing a file of
    # the input directory would destroy it; a new file in a run directory is fine (the README's quick start).
    checkpoint = tmp_path / "run" / "iter_0000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / ".metadata").write_bytes(b"")
    score = ["score", "--checkpoint", str(tmp_path / "run"), "--data", str(source), "--output"]
    one_line(*main([*score, str(checkpoint / "s.jsonl")], capsys), "lies inside the checkpoint", "seals")
    one_line(*main([*score, str(checkpoint / ".metadata")], capsys), "would overwrite", "part of the input")
    one_line(*main([*score, str(tmp_path / "run" / "s.jsonl")], capsys), "not a megatron-prm checkpoint")


def test_preprocess_refuses_an_existing_store_without_overwrite(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    prefix = tmp_path / "store"
    base = ["preprocess", "--data", str(data), "--tokenizer", MISTRAL, "--max-seq-len", "64", "--output-prefix", str(prefix)]
    assert main(base, capsys)[0] == 0
    written = snapshot(*sorted(tmp_path.glob("store.*")))
    one_line(*main(base, capsys), "existing store", "--overwrite")
    assert snapshot(*sorted(tmp_path.glob("store.*"))) == written
    assert main([*base, "--overwrite"], capsys)[0] == 0
    # A prefix whose store file would be the data file itself.
    sidecar = write_jsonl(tmp_path / "x.meta.json", [GOOD])
    one_line(*main(["preprocess", "--data", str(sidecar), "--tokenizer", MISTRAL, "--output-prefix", str(tmp_path / "x"),
                    "--overwrite"], capsys), "would overwrite the input")


def convert_hf_main(args: list[str], capsys) -> tuple[int, str]:
    """``tools/convert_hf.py ARGS`` in this process: the exit status and stderr."""
    spec = importlib.util.spec_from_file_location("convert_hf_tool", REPO / "tools" / "convert_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(args)
    return code, capsys.readouterr().err


def test_convert_hf_never_writes_into_its_input(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    one_line(*convert_hf_main(["import", "--hf", str(hf), "--out", str(hf)], capsys), "would overwrite the input")
    (hf / "original").mkdir()
    one_line(*convert_hf_main(["import", "--hf", str(hf), "--out", str(hf / "original")], capsys),
             "part of the input")
    one_line(*convert_hf_main(["import", "--hf", str(hf), "--out", str(tmp_path)], capsys), "holds the input")
    (hf / "manifest.json").write_text("{}")  # now sealed as a checkpoint: nothing may be added to it
    one_line(*convert_hf_main(["export", "--megatron", str(hf), "--out", str(hf / "x")], capsys),
             "lies inside the checkpoint")
    one_line(*convert_hf_main(["import", "--hf", str(hf), "--out", str(hf / "config.json" / "x")], capsys),
             "is a file, not a directory")
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "manifest.json", "original"]


# ------------------------------------------------------------------------------------- error boundary


def test_unreadable_file_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from megatron_prm.data import records

    data = write_jsonl(tmp_path / "d.jsonl", [PROCESSBENCH])

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(records, "open_data", refused)  # as chmod 0 would for anyone but root
    args = ["convert-data", "--from", "processbench", "--input", str(data), "--output", str(tmp_path / "o.jsonl")]
    one_line(*main(args, capsys), f"{data}: Permission denied")
    with pytest.raises(PermissionError):
        cli.main(["--debug", *args])
    with pytest.raises(PermissionError):
        cli.main([*args, "--debug"])
    monkeypatch.setenv("MEGATRON_PRM_DEBUG", "1")
    with pytest.raises(PermissionError):
        cli.main(args)
    assert not (tmp_path / "o.jsonl").exists()


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("line,field,problem", [
    ('{"src": "q", "responses": ["a"], "labels": ' + _deep(100_000) + '}', "<json>", "nested deeper"),
    ('{"src": "q", "responses": ["a"], "labels": [' + "9" * 5000 + ']}', "<json>", "not readable JSON"),
    ('{"src": "q\\ud800", "responses": ["a"], "labels": ["+"]}', "src", "lone surrogate"),
    ('{"src": "q", "responses": ["a", "b\\udfff"], "labels": ["+", "+"]}', "responses[1]", "lone surrogate"),
    ('{"src": "q", "responses": ["a"], "labels": ["+"], "meta": {"\\ud83d": 1}}', "meta (a key)", "lone surrogate"),
])
def test_values_json_spells_but_no_reader_can_use(tmp_path, line, field, problem):
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD)
    path.write_text(f"{good}\n{line}\n{good}\n")
    values = list(iter_raw_records(path, keep_invalid=True))
    assert [type(v).__name__ for _, _, v in values] == ["dict", "RecordError", "dict"]
    error = values[1][2]
    assert (error.index, error.line, error.field) == (1, 2, field) and problem in str(error)
    with pytest.raises(RecordError, match="record 1 \\(line 2\\)"):
        list(iter_raw_records(path))
    # A valid surrogate pair is text.
    path.write_text('{"src": "\\ud83d\\ude00", "responses": ["a"], "labels": ["+"]}\n')
    assert [v["src"] for _, _, v in iter_raw_records(path)] == ["\U0001F600"]


def test_a_json_array_with_a_lone_surrogate_names_the_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[' + json.dumps(GOOD) + ', {"src": "\\ud800", "responses": ["a"], "labels": ["+"]}]')
    with pytest.raises(RecordError, match="record 1, field 'src'"):
        list(iter_raw_records(path))


def test_a_label_too_large_for_a_float_is_refused_by_name(tmp_path):
    assert parse_label(10 ** 400, ("+", "-")) is None
    with pytest.raises(RecordError, match="labels\\[0\\]"):
        validate_record({"src": "q", "responses": ["a"], "labels": [10 ** 400]}, path="d", index=0, line=1,
                        reward_tokens=("+", "-"))


def test_deep_nesting_in_check_data_and_convert_data(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"src": ' + _deep(50_000) + "}\n")
    one_line(*main(["check-data", "--data", str(path), "--tokenizer", MISTRAL], capsys), "record 1 (line 2)",
             "nested deeper")
    path.write_text(json.dumps(PROCESSBENCH) + "\n" + '{"problem": ' + _deep(50_000) + "}\n")
    code, err = main(["convert-data", "--from", "processbench", "--input", str(path), "--output",
                      str(tmp_path / "o.jsonl")], capsys)
    assert code == 0 and "skipped: 1 (not valid JSON)" in err, err  # skipped and counted, like any unreadable line


# ---------------------------------------------------------------------------------- option ranges


def _numeric_options():
    for program, factory, sub, required in COMMAND_LINES:
        parser = factory()
        target = _subparsers(parser)[sub] if sub else parser
        for action in target._actions:
            if action.option_strings and (isinstance(action.type, RangeChecked) or action.type in (int, float)):
                yield program, factory, sub, required, action


def test_every_numeric_option_of_every_command_has_a_range():
    options = list(_numeric_options())
    assert len(options) > 30
    for program, _, sub, _, action in options:
        assert isinstance(action.type, RangeChecked), (program, sub, action.option_strings)
        assert action.dest in OPTION_RANGES


@pytest.mark.parametrize("program,sub,option,value", [
    ("megatron-prm", "score", "--batch-size", "0"),
    ("megatron-prm", "preprocess", "--workers", "0"),
    ("megatron-prm", "check-data", "--max-seq-len", "100000000"),
    ("megatron-prm", "evaluate", "--threshold", "1.5"),
    ("megatron-prm", "evaluate", "--threshold", "nan"),
    ("megatron-prm", "plan", "--gpu-memory-gib", "0"),
    ("tools/convert_hf.py", "import", "--tp", "0"),
    ("tools/convert_hf.py", "import", "--tp", "-1"),
    ("tools/convert_hf.py", "import", "--pp", "0"),
    ("tools/convert_hf.py", "export", "--max-shard-size", "0"),
    ("tools/convert_hf.py", "export", "--max-shard-size", "0.1B"),
])
def test_out_of_range_options_are_usage_errors(program, sub, option, value, capsys):
    factory, required = next((f, r) for p, f, s, r in COMMAND_LINES if p == program and s == sub)
    with pytest.raises(SystemExit) as exit_:
        factory().parse_args([sub, *required, option, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and option in err and ("must be" in err or "invalid" in err), err


def test_each_range_refuses_below_its_bound_and_accepts_it():
    for program, factory, sub, required, action in _numeric_options():
        allowed = action.type.allowed
        if allowed.low is None:
            continue
        low = allowed.low
        below = low - 1 if not allowed.low_open else low
        if action.type.convert is int or getattr(action.type.convert, "__name__", "") == "parse_size":
            below = int(below)
        with pytest.raises(argparse.ArgumentTypeError):
            action.type(str(below))
        if not allowed.low_open:
            action.type(str(int(low)) if low == int(low) else str(low))


# ------------------------------------------------------------------------------------- source schemas

QUESTION_FIELDS = {  # format -> (a good record, where its question is)
    "processbench": (PROCESSBENCH, ("problem",)),
    "prm800k": ({"question": {"problem": "P"}, "label": {"steps": [
        {"completions": [{"text": "a", "rating": 1}], "chosen_completion": 0}]}}, ("question", "problem")),
    "prmbench": ({"idx": 1, "classification": "circular", "modified_question": "Q", "modified_process": ["a", "b"],
                  "error_steps": [2]}, ("modified_question",)),
    "best-of-n": ({"id": "g", "problem": "P", "candidates": [{"steps": ["a"], "correct": True}]}, ("problem",)),
}


def _with(record: dict, path: tuple, value) -> dict:
    record = json.loads(json.dumps(record))
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return record


@pytest.mark.parametrize("source_format", sorted(QUESTION_FIELDS))
@pytest.mark.parametrize("question", [7, ["a list"], None, "  "])
def test_a_question_that_is_not_text_is_skipped_by_name(tmp_path, source_format, question):
    from megatron_prm.data.convert import convert_file

    good, where = QUESTION_FIELDS[source_format]
    source = write_jsonl(tmp_path / "in.jsonl", [good, _with(good, where, question)])
    report = convert_file(source_format, source, tmp_path / "out.jsonl", show_progress=False).as_dict()
    field = ".".join(where)
    (reason, count), = report["skipped_by_reason"].items()
    assert count == 1 and reason.startswith(f"{field}: expected a non-blank string, got "), reason
    assert report["first_skipped_by_reason"][reason].startswith(f"{source}: record 1 (line 2), field '{field}': expected")
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(written) == 1 and all(isinstance(record["src"], str) for record in written)


@pytest.mark.parametrize("label", [True, False, 1.0, "1", -2])
def test_processbench_label_must_be_an_integer_not_a_bool(label):
    from megatron_prm.data.convert import Skip, convert_processbench

    with pytest.raises(Skip, match="label: expected an integer >= -1, got"):
        convert_processbench({**PROCESSBENCH, "label": label})
    with pytest.raises(Skip, match="label is not -1 or a step index"):
        convert_processbench({**PROCESSBENCH, "label": 10 ** 400})


@pytest.mark.parametrize("steps,field", [
    ("not a list", "label.steps"),
    ([7], "label.steps[]"),
    ([{"completions": "abc", "chosen_completion": 0}], "label.steps[].completions"),
    ([{"completions": {"text": "a"}, "chosen_completion": 0}], "label.steps[].completions"),
    ([{"completions": ["a completion as a string"], "chosen_completion": 0}], "label.steps[].completions[]"),
    ([{"completions": [{"text": 5, "rating": 1}], "chosen_completion": 0}], "label.steps[].completions[].text"),
    ([{"completions": [{"text": "a", "rating": "1"}], "chosen_completion": 0}], "label.steps[].completions[].rating"),
    ([{"completions": [], "human_completion": 3}], "label.steps[].human_completion"),
])
def test_prm800k_fields_of_the_wrong_type_are_skipped_by_name(steps, field):
    from megatron_prm.data.convert import SchemaSkip, convert_prm800k

    with pytest.raises(SchemaSkip) as skipped:
        convert_prm800k({"question": {"problem": "P"}, "label": {"steps": steps}})
    assert str(skipped.value).startswith(f"{field}: expected")


def test_convert_data_prints_the_first_record_of_each_schema_reason(tmp_path, capsys):
    source = write_jsonl(tmp_path / "pb.jsonl", [PROCESSBENCH, {**PROCESSBENCH, "label": True}])
    code, err = main(["convert-data", "--from", "processbench", "--input", str(source), "--output",
                      str(tmp_path / "o.jsonl")], capsys)
    assert code == 0 and "1 (label: expected an integer >= -1, got true/false)" in err
    assert f"skipped, for example: {source}: record 1 (line 2), field 'label': expected an integer >= -1, got true" in err


@pytest.mark.parametrize("packing,message", [
    ([], "1 training sample is fewer than one global batch of 8 (micro batch 1 x 8 micro batches x 1 data-parallel"),
    (["--greedy_zero_padding", "true"], "the training data packs into 1 row of 128 tokens, fewer than one global "
                                        "batch of 8 rows (8 micro batches x 1 data-parallel ranks)"),
])
def test_fewer_records_than_one_global_batch_is_one_line(tmp_path, packing, message):
    from conftest import run_cli
    from megatron_prm.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "all.jsonl", 4, seed=5)
    one = tmp_path / "one.jsonl"
    one.write_text(data.read_text().splitlines()[0] + "\n")
    result = run_cli(["train", "--tokenizer_name_or_path", MISTRAL, "--num_hidden_layers", "1", "--hidden_size", "32",
                      "--intermediate_size", "64", "--num_attention_heads", "2", "--max_seq_len", "128",
                      "--max_prompt_len", "64", "--device", "cpu", "--bf16", "false", "--dev_dataset_path", "null",
                      "--gradient_accumulation_steps", "8", *packing,
                      "--train_dataset_path", str(one), "--output_dir", str(tmp_path / "run")], check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    one_line(result.returncode, result.stderr, message)
    assert "(ValueError)" not in result.stderr
