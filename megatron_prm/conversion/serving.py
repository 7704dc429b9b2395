"""What a serving engine needs to give an export's P(good), written beside the weights as ``prm_serving.json``.

The three kinds of export hold the reward differently, so an engine reads P(good) from a different place:
- ``causal-lm``: the LM head's good and bad vocabulary columns at each step tag. A pooling engine returns
  hidden states, not vocabulary logits, so vLLM must turn the model into a two-class classifier built from
  those two LM-head rows (``--convert classify`` with ``classifier_from_token``, good first);
- ``token-classifier``: ``score`` rows (good, bad), the same two LM-head rows;
- ``mlp-head``: Qwen2.5-Math-PRM's classifier, whose classes are (bad, good).
The vLLM command lines are the forms issue 26 measured with vLLM 0.32.0 (P(good) within 1.2e-7 of the
scorer for the causal LM); CI does not run vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_prm.config import LEGACY_TOKENIZATION, TOKENIZATIONS, ConfigError
from megatron_prm.model.architecture import PRM_CLASS_SUFFIX
from megatron_prm.tokenizer import Tokenizer, single_token_id, special_token_ids

SERVING_FILE = "prm_serving.json"
CAUSAL_LM, TOKEN_CLASSIFIER, MLP_HEAD = "causal-lm", "token-classifier", "mlp-head"
EXPORT_KINDS = (CAUSAL_LM, TOKEN_CLASSIFIER, MLP_HEAD)
_CLASS_SUFFIXES = {CAUSAL_LM: "ForCausalLM", TOKEN_CLASSIFIER: "ForTokenClassification", MLP_HEAD: PRM_CLASS_SUFFIX}
# The order of the two values the engine returns at each step tag.
OUTPUT_CLASSES = {CAUSAL_LM: ("good", "bad"), TOKEN_CLASSIFIER: ("good", "bad"), MLP_HEAD: ("bad", "good")}
VLLM_VERSION = "0.32.0"


def export_kind_of(config: dict[str, Any], where: str) -> str:
    """The kind of export an HF ``config.json`` describes, from its ``architectures`` (none: a causal LM)."""
    names = config.get("architectures") or []
    if not names:
        return CAUSAL_LM
    for kind, suffix in _CLASS_SUFFIXES.items():
        if len(names) == 1 and str(names[0]).endswith(suffix):
            return kind
    raise ConfigError(f"{where}: architectures {names} is none of *ForCausalLM, *ForTokenClassification, "
                      f"*{PRM_CLASS_SUFFIX}")


@dataclass(frozen=True)
class ServingInfo:
    """The contents of ``prm_serving.json``."""

    export_kind: str
    architecture: str
    dtype: str  # of the saved weights; vLLM's default `--dtype auto` casts float32 to float16 on CPU
    step_tag: str
    step_tag_id: int
    reward_tokens: Optional[list[str]]  # as the run spells them (good, bad); None for the MLP head (no tokens)
    reward_token_ids: Optional[list[int]]
    reward_token_pieces: Optional[list[str]]  # the vocabulary pieces (convert_ids_to_tokens), e.g. "▁+"
    output_classes: list[str]
    p_good_column: int
    vllm_version: str
    vllm_command: str
    # How the run tokenized records: what to send the engine (README, "Serving"). None: not trained by a run
    # of this project. Files written before the field existed come from per_step runs.
    tokenization: Optional[str] = None

    def one_line(self, path: Path) -> str:
        tokens = (f", reward tokens {self.reward_token_pieces} (ids {self.reward_token_ids})"
                  if self.reward_token_ids else "")
        return (f"serving ({self.export_kind}): step tag {self.step_tag!r} (id {self.step_tag_id}){tokens}, "
                f"P(good) in column {self.p_good_column} of {self.output_classes}, {self.dtype} weights; "
                f"vLLM command in {path}")


def _family_prefix(architecture: str, kind: str) -> str:
    return architecture[: -len(_CLASS_SUFFIXES[kind])]


def vllm_command(model_dir: str, kind: str, architecture: str, dtype: str, step_tag_id: int,
                 reward_pieces: Optional[list[str]]) -> str:
    """``vllm serve`` for this export: the pooling runner, STEP pooling at the step tag (without
    ``step_tag_id`` vLLM falls back to Qwen's ``<extra_0>`` id and returns nothing for another tag), the
    weights' dtype, and for a causal LM the conversion to a classifier over the reward tokens' LM-head rows."""
    pooler = {"pooling_type": "STEP", "step_tag_id": step_tag_id, "task": "token_classify"}
    words = ["vllm", "serve", model_dir, "--runner", "pooling", "--dtype", dtype]
    if kind == CAUSAL_LM:
        overrides = {"architectures": [_family_prefix(architecture, kind) + "ForSequenceClassification"],
                     "classifier_from_token": reward_pieces, "method": "no_post_processing"}
        words += ["--convert", "classify", "--hf-overrides", json.dumps(overrides, ensure_ascii=False)]
    words += ["--pooler-config", json.dumps(pooler)]
    return " ".join(shlex.quote(word) for word in words)


def describe_serving(tokenizer: Tokenizer, kind: str, architecture: str, dtype: str, step_tag: str,
                     reward_tokens: list[str], model_dir: str, tokenization: Optional[str] = None) -> ServingInfo:
    """The serving facts of an export, its ids read from its own ``tokenizer``."""
    if kind == MLP_HEAD:  # the head's two classes are not tokens
        step_tag_id, _ = single_token_id(tokenizer, step_tag, "the step tag (placeholder_token)")
        reward, ids, pieces = None, None, None
    else:
        special = special_token_ids(tokenizer, step_tag, reward_tokens, add_missing=False)
        step_tag_id, reward, ids = special.placeholder, list(reward_tokens), [special.good, special.bad]
        pieces = tokenizer.pieces(ids)
    classes = OUTPUT_CLASSES[kind]
    return ServingInfo(export_kind=kind, architecture=architecture, dtype=dtype, step_tag=step_tag,
                       step_tag_id=step_tag_id, reward_tokens=reward, reward_token_ids=ids, reward_token_pieces=pieces,
                       output_classes=list(classes), p_good_column=classes.index("good"), vllm_version=VLLM_VERSION,
                       vllm_command=vllm_command(model_dir, kind, architecture, dtype, step_tag_id, pieces),
                       tokenization=tokenization)


def write_serving_info(directory: Path, info: ServingInfo) -> Path:
    path = directory / SERVING_FILE
    path.write_text(json.dumps(dataclasses.asdict(info), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_serving_info(directory: Path) -> Optional[ServingInfo]:
    """The ``prm_serving.json`` of an export directory (None without one)."""
    path = directory / SERVING_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got {type(values).__name__}")
    fields = {f.name for f in dataclasses.fields(ServingInfo)}
    values.setdefault("tokenization", LEGACY_TOKENIZATION)
    missing = sorted(fields - set(values))
    if missing:
        raise ConfigError(f"{path}: lacks {', '.join(missing)}")
    info = ServingInfo(**{name: values[name] for name in fields})
    if info.tokenization is not None and info.tokenization not in TOKENIZATIONS:
        raise ConfigError(f"{path}: tokenization must be one of {', '.join(TOKENIZATIONS)} or null, got "
                          f"{info.tokenization!r}")
    if not isinstance(info.step_tag, str) or not info.step_tag:
        raise ConfigError(f"{path}: step_tag must be a non-empty string, got {info.step_tag!r}")
    if info.reward_tokens is not None and (not isinstance(info.reward_tokens, list) or len(info.reward_tokens) != 2
                                           or not all(isinstance(t, str) for t in info.reward_tokens)):
        raise ConfigError(f"{path}: reward_tokens must be two strings (good, bad) or null, got {info.reward_tokens!r}")
    return info


def export_scoring_settings(hf_dir: Path, config: dict[str, Any]) -> list[str]:
    """The step tag, reward tokens and tokenization an export of this project was trained with, as ``score``
    options (put before the user's, which win): from its ``prm_serving.json``, else a token classifier's
    ``prm_step_tag`` (exports older than that file, trained per step); none for a model this project did not
    export."""
    info = read_serving_info(hf_dir)
    if info is not None:
        settings = [f"--placeholder_token={info.step_tag}"]
        if info.tokenization is not None:
            settings.append(f"--tokenization={info.tokenization}")
        if info.reward_tokens is not None:
            settings.append(f"--reward_tokens={','.join(info.reward_tokens)}")
        return settings
    step_tag = config.get("prm_step_tag")
    if isinstance(step_tag, str) and step_tag:
        return [f"--placeholder_token={step_tag}", f"--tokenization={LEGACY_TOKENIZATION}"]
    return []
