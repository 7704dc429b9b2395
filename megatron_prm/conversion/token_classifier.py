"""A ``*ForTokenClassification`` export read back as the causal LM it came from, for ``score --hf``.

The export's ``score`` rows are the LM-head rows of the good and bad reward tokens, so a causal LM whose LM
head is zero but for those two rows, at the reward ids the scorer reads, gives the same P(good): the scorer
takes the softmax over exactly those two columns. The LM head is untied from the embedding, so the rows
placed in it never change a token's input embedding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_prm.config import PRMArguments
from megatron_prm.conversion.safetensors_io import CheckpointFormatError, SafetensorsReader, TensorEntry
from megatron_prm.conversion.serving import TOKEN_CLASSIFIER, export_kind_of
from megatron_prm.model.architecture import Architecture, read_hf_config
from megatron_prm.tokenizer import load_tokenizer, special_token_ids

LM_HEAD_NAME = "lm_head.weight"
SCORE_WEIGHT, SCORE_BIAS = "score.weight", "score.bias"
_CLASSIFIER_FIELDS = ("id2label", "label2id", "prm_step_tag", "prm_step_tag_id", "auto_map")


def causal_lm_config(config: dict[str, Any]) -> dict[str, Any]:
    """The token classifier's config as its causal LM's, with an LM head of its own."""
    causal = {k: v for k, v in config.items() if k not in _CLASSIFIER_FIELDS}
    causal["architectures"] = [config["architectures"][0].replace("ForTokenClassification", "ForCausalLM")]
    causal["tie_word_embeddings"] = False
    return causal


class ScoreRowsAsLMHead:
    """A token classifier's tensors as its causal LM's: ``lm_head.weight`` is zero but for rows ``good_id``
    and ``bad_id``, which are ``score.weight``'s; ``score.*`` are consumed. Reads like a
    :class:`SafetensorsReader`."""

    def __init__(self, reader: SafetensorsReader, arch: Architecture, good_id: int, bad_id: int) -> None:
        self.directory, self._reader = reader.directory, reader
        self._rows = (good_id, bad_id)
        score = reader.entries.get(SCORE_WEIGHT)
        if score is None or score.shape != (2, arch.hidden_size):
            found = "missing" if score is None else f"of shape {list(score.shape)} in {score.file.name}"
            raise CheckpointFormatError(f"{reader.directory}: {SCORE_WEIGHT} is {found}; a token classifier of "
                                        f"this project has 2 rows of hidden_size {arch.hidden_size}")
        bias = reader.entries.get(SCORE_BIAS)
        if bias is not None and (bias.shape != (2,) or torch.any(reader.read(SCORE_BIAS) != 0)):
            raise CheckpointFormatError(f"{bias.file}: {SCORE_BIAS} is not zero; scoring takes the reward rows "
                                        "of an LM head, which has no bias")
        if max(self._rows) >= arch.vocab_size:
            raise CheckpointFormatError(f"{reader.directory}: reward token ids {list(self._rows)} lie outside "
                                        f"vocab_size {arch.vocab_size}")
        self.entries: dict[str, TensorEntry] = {
            name: entry for name, entry in reader.entries.items() if name not in (SCORE_WEIGHT, SCORE_BIAS)}
        self.entries[LM_HEAD_NAME] = dataclasses.replace(score, shape=(arch.vocab_size, arch.hidden_size))

    def names(self) -> set[str]:
        return set(self.entries)

    def read(self, name: str) -> torch.Tensor:
        if name != LM_HEAD_NAME:
            return self._reader.read(name)
        score = self._reader.read(SCORE_WEIGHT)
        head = score.new_zeros(self.entries[LM_HEAD_NAME].shape)
        head[list(self._rows)] = score
        return head


def scorer_reward_ids(hf_dir: Path, prm: PRMArguments) -> Optional[tuple[int, int]]:
    """For a token-classifier export, the ids (good, bad) the scorer will read with ``prm``'s reward tokens and
    the export's tokenizer: where its score rows go. None for the other kinds."""
    if export_kind_of(read_hf_config(hf_dir), str(hf_dir / "config.json")) != TOKEN_CLASSIFIER:
        return None
    special = special_token_ids(load_tokenizer(str(hf_dir)), prm.placeholder_token, prm.reward_token_list,
                                add_missing=False)
    return special.good, special.bad
