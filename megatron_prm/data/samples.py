"""Records -> token-id samples with one label position per kept step.

Two tokenizations (``SampleOptions.tokenization``):

- ``whole_text``: the record is rendered once as text (prompt, then each step followed by the step tag)
  and tokenized whole, as a serving engine tokenizes the text it is sent; the step tags are found in the
  ids (:mod:`megatron_prm.data.whole_text`), and a record whose tags do not come out as exactly one tag id
  each is refused (counted under ``skip_invalid``).
- ``per_step``: sequences are assembled from token ids: the prompt's ids, then each step tokenized on its
  own followed by the placeholder id. ``"ки"`` alone and ``" ки"`` inside text tokenize differently
  (OpenRLHF #509); appending the id sidesteps that, but an engine sent the text sees other ids.

Either way the count of placeholder ids must equal the count of steps, which catches a placeholder
hidden in the text.

Truncation works on whole steps: a prompt longer than ``max_prompt_len`` keeps its end (after BOS),
trailing steps that do not fit ``max_seq_len`` are dropped together with their labels, and a record
with no step left is dropped. In ORM mode the only label sits on the last step, so a record whose
last step does not fit is dropped rather than trained on an intermediate step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from megatron_prm.data.records import Record, RecordError, iter_raw_records, validate_record
from megatron_prm.config import DEFAULT_TOKENIZATION, TOKENIZATIONS, WHOLE_TEXT
from megatron_prm.data.whole_text import render, tag_spelling, tokenize_whole
from megatron_prm.tokenizer import SpecialTokenIds, Tokenizer, TokenizerError
from megatron_prm.progress import progress


@dataclass(frozen=True)
class SampleOptions:
    """What turns a record into a sample."""

    max_seq_len: int
    max_prompt_len: int
    process_reward: bool = True
    apply_chat_template: bool = False
    system_prompt: Optional[str] = None
    tokenization: str = DEFAULT_TOKENIZATION  # WHOLE_TEXT or PER_STEP

    def __post_init__(self) -> None:
        if self.tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization must be one of {', '.join(TOKENIZATIONS)}, got {self.tokenization!r}")


@dataclass
class Sample:
    """One tokenized record.

    ``label_positions`` index the placeholder tokens whose reward logits are trained;
    ``label_values`` hold P(good) targets (NaN where the record carries no labels, for scoring);
    ``step_ids`` say which response step each position ends.
    """

    input_ids: np.ndarray  # int32 [T]
    label_positions: np.ndarray  # int32 [n]
    label_values: np.ndarray  # float32 [n]
    step_ids: np.ndarray  # int32 [n]
    record_index: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class DataReport:
    """Counts over one pass of a data file, for ``check-data`` and the training log."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    invalid: int = 0
    steps: int = 0
    labelled_positions: int = 0
    positive_sum: float = 0.0
    tokens: int = 0
    reasons: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)  # labelled positions: good (1), bad (0), soft (between)

    def merge(self, other: "DataReport") -> None:
        for name in ("records", "kept", "truncated", "dropped", "invalid", "steps", "labelled_positions",
                     "positive_sum", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reasons.update(other.reasons)
        self.labels.update(other.labels)

    def count_labels(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        good, bad = int((values == 1.0).sum()), int((values == 0.0).sum())
        self.labels.update({"good": good, "bad": bad, "soft": int(values.size) - good - bad})

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "kept": self.kept,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "invalid": self.invalid,
            "steps": self.steps,
            "labelled_positions": self.labelled_positions,
            "positive_share": round(self.positive_sum / self.labelled_positions, 6)
            if self.labelled_positions
            else None,
            "tokens": self.tokens,
            "label_counts": {name: self.labels[name] for name in ("good", "bad", "soft")},
            "reasons": dict(sorted(self.reasons.items())),
        }


def chat_messages(record: Record, options: SampleOptions) -> list[dict[str, str]]:
    """The system prompt (if any) and the record's turns as user / assistant messages."""
    messages = [{"role": "system", "content": options.system_prompt}] if options.system_prompt is not None else []
    for turn, user in enumerate(record.src):
        messages.append({"role": "user", "content": user})
        if turn < len(record.tgt):
            messages.append({"role": "assistant", "content": record.tgt[turn]})
    return messages


def prompt_ids(record: Record, tokenizer: Tokenizer, options: SampleOptions) -> list[int]:
    """The ids before the first step (``per_step``). Plain: BOS, then the turns in conversation order, user
    turns as they are, assistant turns + EOS. With ``apply_chat_template``: the tokenizer's chat template
    rendered over the system prompt (if any) and the turns as user / assistant messages, up to the content of
    the assistant turn that the steps make up."""
    if options.apply_chat_template:
        return tokenizer.chat_prefix_ids(chat_messages(record, options))
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for turn, user in enumerate(record.src):
        ids += tokenizer.encode(user)
        if turn < len(record.tgt):
            ids += tokenizer.encode(record.tgt[turn])
            if tokenizer.eos_id is not None:
                ids.append(tokenizer.eos_id)
    return ids


class SampleBuilder:
    """Turns validated records into samples and keeps the counts of what happened."""

    def __init__(self, tokenizer: Tokenizer, special: SpecialTokenIds, options: SampleOptions):
        if options.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise TokenizerError(f"apply_chat_template needs a Hugging Face tokenizer with a chat template "
                                 f"(tokenizer_config.json chat_template or chat_template.jinja); {tokenizer.name} "
                                 "has none")
        self.tokenizer = tokenizer
        self.special = special
        self.options = options
        self.report = DataReport()
        self._tag_text = (tag_spelling(tokenizer, special.placeholder_text, special.placeholder)
                          if options.tokenization == WHOLE_TEXT else "")

    def _whole_text_ids(self, record: Record, path) -> tuple[list[int], list[list[int]]]:
        """The prompt's ids and each step's ids (ending with its tag) from the record tokenized whole."""
        chat_prefix = (self.tokenizer.chat_prefix_text(chat_messages(record, self.options))
                       if self.options.apply_chat_template else None)
        bos = None if self.options.apply_chat_template else self.tokenizer.bos_id
        tokens = tokenize_whole(render(record, self._tag_text, chat_prefix), self.tokenizer,
                                self.special.placeholder, bos, record, path)
        starts = [tokens.prompt_len] + [position + 1 for position in tokens.tag_positions[:-1]]
        steps = [tokens.ids[start:stop + 1] for start, stop in zip(starts, tokens.tag_positions)]
        return tokens.ids[:tokens.prompt_len], steps

    def _fail_if_placeholder(self, ids: list[int], record: Record, field_name: str, path) -> None:
        if self.special.placeholder in ids:
            raise RecordError(
                path,
                record.index,
                field_name,
                f"contains the placeholder token (id {self.special.placeholder}); it would add an "
                "unlabelled step marker, so the placeholder count would not match the labels",
            )

    def build(self, record: Record, path: str | Path = "<records>") -> Optional[Sample]:
        """The sample of ``record``, or None when it is dropped (the reason is counted)."""
        opts = self.options
        report = self.report
        if opts.tokenization == WHOLE_TEXT:
            prompt, steps = self._whole_text_ids(record, path)
        else:
            prompt = prompt_ids(record, self.tokenizer, opts)
            self._fail_if_placeholder(prompt, record, "src/tgt", path)
            steps = None
        truncated = False
        if len(prompt) > opts.max_prompt_len:
            if opts.apply_chat_template:
                report.dropped += 1  # cut, it would lose the template's opening (the system turn) and still be scored
                report.reasons["chat prompt longer than max_prompt_len"] += 1
                return None
            keep_bos = int(self.tokenizer.bos_id is not None and prompt[0] == self.tokenizer.bos_id)
            prompt = prompt[:keep_bos] + prompt[len(prompt) - (opts.max_prompt_len - keep_bos):]
            truncated = True
            report.reasons["prompt truncated"] += 1

        ids = list(prompt)
        positions: list[int] = []
        for step_index, step in enumerate(record.responses):
            if steps is not None:
                step_ids = steps[step_index]  # its tag included
            else:
                step_ids = self.tokenizer.encode(step)
                self._fail_if_placeholder(step_ids, record, f"responses[{step_index}]", path)
                step_ids.append(self.special.placeholder)
            if len(ids) + len(step_ids) > opts.max_seq_len:
                break
            ids += step_ids
            positions.append(len(ids) - 1)

        kept_steps = len(positions)
        all_steps = len(record.responses)
        if kept_steps == 0:
            report.dropped += 1
            report.reasons["no step fits max_seq_len"] += 1
            return None
        if kept_steps < all_steps:
            if not opts.process_reward:
                report.dropped += 1
                report.reasons["last step does not fit (ORM)"] += 1
                return None
            truncated = True
            report.reasons["steps dropped to fit max_seq_len"] += 1

        placeholder_count = sum(1 for token in ids if token == self.special.placeholder)
        assert placeholder_count == kept_steps, (placeholder_count, kept_steps)

        labels = record.labels if record.labels is not None else (float("nan"),) * all_steps
        step_ids_arr = np.arange(kept_steps, dtype=np.int32)
        if not opts.process_reward:
            step_ids_arr = step_ids_arr[-1:]
        sample = Sample(
            input_ids=np.asarray(ids, dtype=np.int32),
            label_positions=np.asarray(positions, dtype=np.int32)[step_ids_arr],
            label_values=np.asarray(labels[:kept_steps], dtype=np.float32)[step_ids_arr],
            step_ids=step_ids_arr,
            record_index=record.index,
        )
        report.kept += 1
        report.truncated += int(truncated)
        report.steps += kept_steps
        report.labelled_positions += len(sample.label_positions)
        report.positive_sum += float(np.nansum(sample.label_values))
        report.count_labels(sample.label_values)
        report.tokens += len(sample)
        return sample


def samples_from_raw(
    raw_records: Iterable[tuple[int, Optional[int], object]],
    builder: SampleBuilder,
    path: str | Path,
    reward_tokens: tuple[str, str],
    *,
    skip_invalid: bool = False,
    require_labels: bool = True,
) -> Iterator[Sample]:
    """Validate and tokenize raw records; counts go to ``builder.report``. A raw record may be the
    :class:`RecordError` of a line that could not be read (see ``iter_raw_records(keep_invalid=True)``):
    it is raised, or under ``skip_invalid`` counted like any invalid record."""
    for index, line, raw in raw_records:
        builder.report.records += 1
        try:
            if isinstance(raw, RecordError):
                raise raw
            record = validate_record(
                raw, path=path, index=index, line=line, reward_tokens=reward_tokens, require_labels=require_labels
            )
            sample = builder.build(record, path)
        except RecordError as err:
            if not skip_invalid or err.index < 0:
                raise
            builder.report.invalid += 1
            builder.report.reasons[err.reason] += 1
            continue
        if sample is not None:
            yield sample


def load_samples(
    path: str | Path,
    tokenizer: Tokenizer,
    special: SpecialTokenIds,
    options: SampleOptions,
    reward_tokens: tuple[str, str],
    *,
    skip_invalid: bool = False,
    require_labels: bool = True,
    show_progress: bool = True,
) -> tuple[list[Sample], DataReport]:
    """Read, validate and tokenize every record of a file; a file without a usable record is an error."""
    builder = SampleBuilder(tokenizer, special, options)
    raw = progress(iter_raw_records(path, keep_invalid=skip_invalid), desc=f"tokenizing {Path(path).name}",
                   unit="records", enabled=show_progress)
    samples = list(samples_from_raw(raw, builder, path, reward_tokens, skip_invalid=skip_invalid,
                                    require_labels=require_labels))
    check_not_empty(builder.report, path)
    return samples, builder.report


def check_not_empty(report: DataReport, path: str | Path) -> None:
    """Refuse a data set that yields no sample: an empty file, or one whose every record was dropped."""
    if report.kept == 0:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(report.reasons.items()))
        raise RecordError(path, -1, "<file>", f"no usable record ({report.records} read"
                          + (f"; {counts})" if counts else ")"))
