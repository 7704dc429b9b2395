"""Every reader of data files: one clear error naming the file and line, or (under skip_invalid) the
record skipped and counted; a UTF-8 byte-order mark is accepted; a data set without a record is refused."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import MISTRAL, write_jsonl
from megatron_prm.data.convert import convert_file
from megatron_prm.data.records import RecordError, iter_raw_records
from megatron_prm.data.samples import SampleOptions, load_samples
from megatron_prm.tokenizer import special_token_ids

REWARD = ("+", "-")
GOOD = {"src": "1 + 1?", "responses": ["1 + 1 = 2"], "labels": ["+"]}
LINE = json.dumps(GOOD).encode()


@pytest.fixture(scope="module")
def special(mistral_tokenizer):
    return special_token_ids(mistral_tokenizer, "ки", ["+", "-"])


def load(path, tokenizer, special, skip_invalid=False):
    return load_samples(path, tokenizer, special, SampleOptions(128, 64), REWARD, skip_invalid=skip_invalid,
                        show_progress=False)


def test_bytes_that_are_not_utf8_spoil_only_their_line(tmp_path, mistral_tokenizer, special):
    path = tmp_path / "d.jsonl"
    path.write_bytes(LINE + b"\n" + LINE.replace(b"1 + 1 = 2", b"1 + 1 = \xff2") + b"\n" + LINE + b"\n")
    with pytest.raises(RecordError) as err:
        load(path, mistral_tokenizer, special)
    assert (err.value.index, err.value.line) == (1, 2)
    assert f"{path}: record 1 (line 2)" in str(err.value) and "not UTF-8: byte 0xff" in str(err.value)
    samples, report = load(path, mistral_tokenizer, special, skip_invalid=True)
    assert len(samples) == 2 and report.records == 3 and report.invalid == 1
    assert report.reasons == {"not UTF-8": 1}


def test_bad_json_lines_are_skipped_and_counted_under_skip_invalid(tmp_path, mistral_tokenizer, special):
    path = tmp_path / "d.jsonl"
    path.write_bytes(LINE + b"\n{oops\n" + LINE + b"\n" + LINE[:-1] + b" trailing}\n" + LINE + b"\n")
    with pytest.raises(RecordError, match="record 1 \\(line 2\\).*not valid JSON"):
        load(path, mistral_tokenizer, special)
    samples, report = load(path, mistral_tokenizer, special, skip_invalid=True)
    assert len(samples) == 3 and report.invalid == 2 and report.reasons == {"not valid JSON": 2}
    assert [i for i, _, raw in iter_raw_records(path, keep_invalid=True) if isinstance(raw, RecordError)] == [1, 3]
    # A pretty-printed stream resumes at the next value after a broken one.
    stream = tmp_path / "stream.json"
    pretty = json.dumps(GOOD, indent=2)
    stream.write_text(pretty + "\n" + pretty.replace('"labels"', '"labels" oops') + "\n" + pretty + "\n")
    values = list(iter_raw_records(stream, keep_invalid=True))
    assert [type(v).__name__ for _, _, v in values] == ["dict", "RecordError", "dict"]
    assert [line for _, line, _ in values] == [1, 1 + pretty.count("\n") + 1, 1 + 2 * (pretty.count("\n") + 1)]


def test_truncated_or_fake_gzip_is_one_clear_error(tmp_path, mistral_tokenizer, special, capsys):
    whole = gzip.compress(b"".join(LINE + b"\n" for _ in range(2000)))
    truncated = tmp_path / "d.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    for skip_invalid in (False, True):
        with pytest.raises(RecordError, match="not a complete gzip file, unreadable after line"):
            load(truncated, mistral_tokenizer, special, skip_invalid=skip_invalid)
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(LINE + b"\n")
    with pytest.raises(RecordError, match=f"{fake}.*not a complete gzip file"):
        list(iter_raw_records(fake))
    from megatron_prm.cli import main

    assert main(["check-data", "--data", str(truncated), "--tokenizer", MISTRAL, "--skip-invalid"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"megatron-prm check-data: error: {truncated}")


def test_utf8_byte_order_mark_is_accepted(tmp_path, mistral_tokenizer, special):
    bom = b"\xef\xbb\xbf"
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(bom + LINE + b"\n" + LINE + b"\n")
    array = tmp_path / "bom.json.gz"
    array.write_bytes(gzip.compress(bom + json.dumps([GOOD, GOOD, GOOD]).encode()))
    assert len(load(jsonl, mistral_tokenizer, special)[0]) == 2
    assert len(load(array, mistral_tokenizer, special)[0]) == 3


def test_a_data_set_without_a_usable_record_is_an_error(tmp_path, mistral_tokenizer, special):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(RecordError, match="no usable record \\(0 read\\)"):
        load(empty, mistral_tokenizer, special)
    invalid = write_jsonl(tmp_path / "invalid.jsonl", [{"src": "q", "responses": ["a"], "labels": ["?"]}])
    with pytest.raises(RecordError, match="no usable record \\(1 read; 1 invalid labels\\)"):
        load(invalid, mistral_tokenizer, special, skip_invalid=True)
    from megatron_prm.data.preprocess import TokenizeJob, preprocess

    job = TokenizeJob(str(empty), MISTRAL, "ки", REWARD, SampleOptions(128, 64), skip_invalid=True)
    with pytest.raises(RecordError, match="no usable record"):
        preprocess(job, tmp_path / "store", show_progress=False)
    assert not list(tmp_path.glob("store*"))


def test_convert_data_skips_and_counts_unreadable_lines(tmp_path):
    good = {"id": "x-1", "problem": "p", "steps": ["a", "b"], "label": 1}
    path = tmp_path / "pb.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\n{oops\n" + json.dumps(good).encode().replace(b'"a"', b'"\xfe"')
                     + b"\n" + json.dumps(good).encode() + b"\n")
    report = convert_file("processbench", path, tmp_path / "out.jsonl", show_progress=False).as_dict()
    assert (report["read"], report["converted"]) == (4, 2)
    assert report["skipped_by_reason"] == {"not UTF-8": 1, "not valid JSON": 1}


def test_streamed_lines_that_cannot_be_read_are_skipped_under_skip_invalid(tmp_path):
    from megatron_prm.data.preprocess import RecordTokenizer, TokenizeJob
    from megatron_prm.data.streaming import ReaderPosition, ReaderShare, _read_block
    from megatron_prm.data.records import open_data

    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + LINE + b"\n{oops\n" + LINE.replace(b"1 + 1 = 2", b"\xc3(") + b"\n" + LINE + b"\n")

    def own_records():
        with open_data(path) as handle:
            raw, _, next_record, _ = _read_block(handle, str(path), ReaderPosition(), ReaderShare(0, 1), size=100)
        assert next_record == 4
        return raw

    job = TokenizeJob(str(path), MISTRAL, "ки", REWARD, SampleOptions(128, 64), skip_invalid=True)
    assert len(list(RecordTokenizer(job).stream(iter(own_records())))) == 2
    strict = RecordTokenizer(TokenizeJob(str(path), MISTRAL, "ки", REWARD, SampleOptions(128, 64), skip_invalid=False))
    with pytest.raises(RecordError, match="record 1 \\(line 2\\).*not valid JSON"):
        list(strict.stream(iter(own_records())))