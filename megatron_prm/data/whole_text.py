"""Tokenization ``whole_text``: a record rendered once as text and tokenized whole, as a serving engine
tokenizes the text it is sent.

The rendered text is the prompt, then every step followed by the step tag, with nothing in between::

    PROMPT \\n STEP_1 TAG STEP_2 TAG ... STEP_N TAG

- PROMPT, plain: the turns in conversation order (``src[0]``, ``tgt[0]``, ``src[1]``, ...) joined by
  ``\\n``, then ``\\n``; the ids start with BOS (as an engine adds it). With ``apply_chat_template``: what the
  chat template renders before the content of the last assistant turn (no ``\\n`` of ours), so the steps
  are that content, as Qwen2.5-Math-PRM's model card joins them (``"<extra_0>".join(steps) + "<extra_0>"``).
- TAG: the step tag as it reads in running text, the spelling whose tokens end with the tag's one id. For
  an added special token (``<extra_0>``) and byte-level BPE vocabularies that is the tag itself; for a
  SentencePiece vocabulary whose one-id piece carries the word-start mark (Mistral's ``▁ки``, id 12902) it
  is ``" ки"``: glued to the step (``"21ки"``) the same letters are another id (1107), the merge
  OpenRLHF #509 tripped over.

Each tag must come out as exactly one tag id ending where that tag ends in the text, and no other tag id
may appear; otherwise the record is refused (:class:`RecordError`; counted under ``skip_invalid``). The
tokenizer's character offsets give each token's end, so step ends and the prompt's length are found in one
pass over the ids, whatever the number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_prm.data.records import Record, RecordError
from megatron_prm.tokenizer import Tokenizer, TokenizerError

# Texts a tag follows when its running-text spelling is worked out: a word, a number, punctuation.
_CONTEXTS = ("The answer", "= 21", "so.")


class StepTagError(RecordError):
    """A record whose step tags do not come out as one tag id each once it is tokenized whole."""

    @property
    def reason(self) -> str:
        return "step tags not one id each in the whole text"

    def __reduce__(self):
        return (StepTagError, (self.path, self.index, self.field, self.problem, self.line))


def tag_spelling(tokenizer: Tokenizer, tag: str, tag_id: int) -> str:
    """How the step tag is written in running text so that it tokenizes to ``tag_id``: ``tag`` itself, or
    with a leading space (SentencePiece pieces that begin a word)."""
    for spelling in (tag, " " + tag):
        if all(tokenizer.encode(context + spelling)[-1:] == [tag_id] for context in _CONTEXTS):
            return spelling
    raise TokenizerError(
        f"the step tag {tag!r} (id {tag_id}) does not tokenize to its id after text with {tokenizer.name}, "
        "with or without a leading space: tokenization whole_text cannot place it; use tokenization per_step")


@dataclass(frozen=True)
class RenderedRecord:
    """A record's text, where its prompt ends and where each step's tag ends (character offsets)."""

    text: str
    prompt_end: int
    tag_ends: list[int]
    step_starts: list[int]


def render(record: Record, tag_text: str, chat_prefix: Optional[str]) -> RenderedRecord:
    """The text of ``record`` (see the module docstring); ``chat_prefix`` is the chat template's rendering
    before the steps, None for a plain prompt."""
    if chat_prefix is None:
        turns = [turn for pair in zip(record.src, [*record.tgt, None]) for turn in pair if turn is not None]
        prompt = "\n".join(turns) + "\n"
    else:
        prompt = chat_prefix
    parts = [prompt]
    length = len(prompt)
    tag_ends, step_starts = [], []
    for step in record.responses:
        step_starts.append(length)
        parts += (step, tag_text)
        length += len(step) + len(tag_text)
        tag_ends.append(length)
    return RenderedRecord("".join(parts), len(prompt), tag_ends, step_starts)


@dataclass(frozen=True)
class WholeTextIds:
    """The ids of a rendered record: how many belong to the prompt and the position of every step's tag."""

    ids: list[int]
    prompt_len: int
    tag_positions: list[int]


def tokenize_whole(rendered: RenderedRecord, tokenizer: Tokenizer, tag_id: int, bos_id: Optional[int],
                   record: Record, path) -> WholeTextIds:
    """Tokenize the rendered text once and find each step's tag id in it; a tag that did not become exactly
    one tag id at its place, or a tag id elsewhere, is a :class:`StepTagError` naming the field."""
    ids, ends = tokenizer.encode_with_ends(rendered.text)
    lead = [bos_id] if bos_id is not None else []
    expected = {end: step for step, end in enumerate(rendered.tag_ends)}
    positions: list[int] = []
    prompt_len = 0
    for index, (token, end) in enumerate(zip(ids, ends)):
        if end <= rendered.prompt_end:
            prompt_len = index + 1
        if token != tag_id:
            continue
        step = expected.get(end)
        if step is None:
            raise StepTagError(path, record.index, _field_at(rendered, end),
                               f"contains the placeholder token (id {tag_id}, {tokenizer.pieces([tag_id])[0]!r}) "
                               "where no step ends once the record is tokenized whole; it would add an unlabelled "
                               "step marker")
        if step != len(positions):
            break  # an earlier step's tag is missing
        positions.append(len(lead) + index)
    if len(positions) != len(rendered.tag_ends):
        _refuse_merged_tag(rendered, ids, ends, tokenizer, tag_id, len(positions), record, path)
    return WholeTextIds(lead + ids, len(lead) + prompt_len, positions)


def _refuse_merged_tag(rendered: RenderedRecord, ids: list[int], ends: list[int], tokenizer: Tokenizer, tag_id: int,
                       step: int, record: Record, path) -> None:
    """Refuse a record whose tag after ``step`` did not come out as the tag id (merged with its neighbours)."""
    start, stop = rendered.step_starts[step], rendered.tag_ends[step]
    around = [token for token, end in zip(ids, ends) if start < end <= stop + 1]
    found = sum(1 for token in ids if token == tag_id)
    raise StepTagError(path, record.index, f"responses[{step}]",
                       f"its step tag does not tokenize to the step-tag id {tag_id} in the whole text (merged with "
                       f"its neighbours: pieces {tokenizer.pieces(around)[-4:]}); {found} tag ids for "
                       f"{len(rendered.tag_ends)} steps; use tokenization per_step for such data")


def _field_at(rendered: RenderedRecord, end: int) -> str:
    """The record field whose text holds the character before offset ``end``."""
    if end <= rendered.prompt_end:
        return "src/tgt"
    for step, stop in enumerate(rendered.tag_ends):
        if end <= stop:
            return f"responses[{step}]"
    return "responses"
