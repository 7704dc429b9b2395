"""Tokenizers from local files only, and the one-id check for the placeholder and reward tokens.

A step tag or reward token that a Hugging Face tokenizer does not hold as one piece (Qwen2.5-Math-PRM's
``<extra_0>`` in a tokenizer without it, say) is added to it as a special token; the model's vocabulary
grows with it (see :func:`megatron_prm.model.architecture.resolve_architecture`) and every checkpoint
saves the tokenizer with the tokens added (:func:`save_with_special_tokens`). Adding is deterministic
(the missing tokens, in the order step tag, good, bad), so a tokenizer loaded again gets the same ids.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from megatron_prm.hub import NotFoundError, is_hub_id, local_path

MISTRAL_COMMON_PREFIX = "mistral-common:"
_STEPS_MARKER = "MEGATRONPRMSTEPSMARKER"  # stands for the steps while a chat template renders the conversation


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded, or a special token that is not exactly one id."""


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The files of a tokenizer directory (added tokens live in tokenizer.json / added_tokens.json); never weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str
    bos_id: Optional[int]
    eos_id: Optional[int]
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        """:meth:`encode`, and where in ``text`` each token ends (a character offset)."""

    def pieces(self, ids: list[int]) -> list[str]:
        """The vocabulary pieces of ``ids`` (for error messages)."""

    def fingerprint(self) -> str:
        """A hash of the tokenizer's files: identifies it in preprocessed data and checkpoints."""


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file (Llama 2, Mistral v0.1)."""

    def __init__(self, path: Path, name: str) -> None:
        import sentencepiece

        self.path = path
        self.name = name
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        try:
            pieces = self._sp.encode(text, return_type="proto").pieces  # sentencepiece 0.2.1 and later
        except TypeError:
            pieces = self._sp.encode(text, out_type="immutable_proto").pieces
        # SentencePiece reports UTF-8 byte offsets into the input; map them to character offsets.
        char_of_byte = [0] * (len(text.encode("utf-8")) + 1)
        byte = 0
        for index, char in enumerate(text):
            byte += len(char.encode("utf-8"))
            char_of_byte[byte] = index + 1
        return [piece.id for piece in pieces], [char_of_byte[piece.end] for piece in pieces]

    def pieces(self, ids: list[int]) -> list[str]:
        return [self._sp.id_to_piece(i) for i in ids]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]


def chat_template_digest(tokenizer: Tokenizer) -> Optional[str]:
    """A hash of the tokenizer's chat template (None without one): the file holding it is not among those
    :meth:`HFTokenizer.fingerprint` hashes (transformers may save it as ``chat_template.jinja``)."""
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(template.encode()).hexdigest()[:16] if template else None


class HFTokenizer:
    """A local Hugging Face tokenizer directory; never downloads, never runs remote code."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.path = path
        self.name = str(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            )
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds here
            raise TokenizerError(f"cannot load a Hugging Face tokenizer from {path}: {err}") from err
        self.bos_id = self._tok.bos_token_id
        self.eos_id = self._tok.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def add_special_token(self, text: str) -> int:
        """Add ``text`` as a special token (matched whole, never split or normalised); its new id."""
        from tokenizers import AddedToken

        self._tok.add_tokens([AddedToken(text, special=True, normalized=False)], special_tokens=True)
        return self._tok.convert_tokens_to_ids(text)

    def save(self, directory: Path) -> None:
        self._tok.save_pretrained(str(directory))

    @property
    def chat_template(self) -> Optional[str]:
        """The chat template's source (None without one)."""
        template = getattr(self._tok, "chat_template", None)
        return template if template is None or isinstance(template, str) else json.dumps(template, sort_keys=True)

    def chat_prefix_text(self, messages: list[dict[str, str]]) -> str:
        """What the tokenizer's chat template renders before the content of a final assistant turn that
        follows ``messages``: the whole conversation is rendered with a marker as that content and cut at
        the marker, as a PRM is scored on the rendered conversation (Qwen2.5-Math-PRM's model card).
        Templates run in transformers' sandboxed Jinja environment: a template cannot run code."""
        rendered = self._tok.apply_chat_template([*messages, {"role": "assistant", "content": _STEPS_MARKER}],
                                                 tokenize=False)
        if rendered.count(_STEPS_MARKER) != 1:
            raise TokenizerError(f"the chat template of {self.name} does not render the assistant turn's content "
                                 "as it is, so the steps have no place in it")
        return rendered[:rendered.index(_STEPS_MARKER)]

    def chat_prefix_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids of :meth:`chat_prefix_text`."""
        return self.encode(self.chat_prefix_text(messages))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        if not self._tok.is_fast:
            raise TokenizerError(f"{self.name} is a slow (Python) tokenizer without character offsets; "
                                 "tokenization whole_text needs a fast one (tokenizer.json), or use per_step")
        encoded = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [end for _, end in encoded["offset_mapping"]]

    def pieces(self, ids: list[int]) -> list[str]:
        return self._tok.convert_ids_to_tokens(ids)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for file in sorted(self.path.iterdir()):
            if file.is_file() and file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                digest.update(file.name.encode())
                digest.update(file.read_bytes())
        return digest.hexdigest()[:16]


def resolve_tokenizer_path(name_or_path: str) -> Path:
    """The file or directory behind a tokenizer argument: a path, a Hub ID (:mod:`megatron_prm.hub`), or
    ``mistral-common:NAME``, a model that package ships."""
    if name_or_path.startswith(MISTRAL_COMMON_PREFIX):
        filename = name_or_path[len(MISTRAL_COMMON_PREFIX):]
        try:
            resource = importlib.resources.files("mistral_common") / "data" / filename
        except ModuleNotFoundError as err:
            raise TokenizerError(
                f"{name_or_path}: the mistral-common package is not installed (pip install mistral-common)"
            ) from err
        path = Path(str(resource))
        if not path.exists():
            raise TokenizerError(f"tokenizer not found: {path}")
        return path
    try:
        return local_path(name_or_path, "tokenizer", TOKENIZER_FILES)
    except NotFoundError as err:
        raise TokenizerError(str(err)) from err


def tokenizer_beside(model_config: Optional[str]) -> Optional[str]:
    """The tokenizer of the HF model whose config ``model_config`` names (its directory, a config.json in
    one, or a Hub ID), when it has one."""
    if not model_config:
        return None
    if is_hub_id(model_config):
        return model_config
    path = Path(model_config)
    directory = path if path.is_dir() else path.parent
    has_tokenizer = any((directory / name).is_file() for name in (*HF_TOKENIZER_FILES, "tokenizer.model"))
    return str(directory) if has_tokenizer else None


def save_tokenizer(name_or_path: str, target: Path) -> list[str]:
    """Copy the tokenizer ``name_or_path`` names into the directory ``target`` (created), byte for byte so
    that its fingerprint stays the same: a directory's tokenizer files (not the model weights beside
    them), or a SentencePiece model as ``tokenizer.model``. Returns the files written."""
    import shutil

    path = resolve_tokenizer_path(name_or_path)
    target.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        shutil.copy2(path, target / "tokenizer.model")
        return ["tokenizer.model"]
    copied = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not copied:
        raise TokenizerError(f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    for name in copied:
        shutil.copy2(path / name, target / name)
    return copied


def load_tokenizer(name_or_path: Optional[str]) -> Tokenizer:
    """Load a SentencePiece ``.model`` file or a local HF tokenizer directory."""
    if not name_or_path:
        raise TokenizerError("tokenizer_name_or_path is not set")
    path = resolve_tokenizer_path(name_or_path)
    if path.is_dir():
        hf_files = [name for name in HF_TOKENIZER_FILES if (path / name).is_file()]
        if not hf_files and (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path / "tokenizer.model", str(path))
        return HFTokenizer(path)
    try:
        return SentencePieceTokenizer(path, name_or_path)
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"{path} is neither a tokenizer directory nor a SentencePiece model: {err}") from err


@dataclass(frozen=True)
class SpecialTokenIds:
    """The placeholder id and the good/bad reward ids, each a single vocabulary entry; ``added`` names
    those that were added to the tokenizer as special tokens; ``placeholder_text`` is the step tag as
    the run spells it."""

    placeholder: int
    good: int
    bad: int
    added: tuple[str, ...] = ()
    placeholder_text: str = ""

    @property
    def reward_ids(self) -> tuple[int, int]:
        return (self.good, self.bad)


def single_token_id(tokenizer: Tokenizer, text: str, argument: str, add_missing: bool = False) -> tuple[int, bool]:
    """The one id that ``text`` encodes to, and whether it was added: a Hugging Face tokenizer that
    splits it gets it as a special token when ``add_missing``; otherwise an error that shows the
    tokenization."""
    ids = tokenizer.encode(text)
    if len(ids) == 1:
        return ids[0], False
    if add_missing and isinstance(tokenizer, HFTokenizer):
        return tokenizer.add_special_token(text), True
    hint = ("; a Hugging Face tokenizer directory would get it added as a special token"
            if add_missing else "")
    raise TokenizerError(
        f"{argument} {text!r} must be exactly one token with {tokenizer.name}, but it encodes to "
        f"{len(ids)} ids {ids} (pieces {tokenizer.pieces(ids)}); choose a token the vocabulary "
        f"holds as one piece{hint}"
    )


def special_token_ids(tokenizer: Tokenizer, placeholder_token: str, reward_tokens: list[str],
                      add_missing: bool = True) -> SpecialTokenIds:
    """The step tag's and reward tokens' ids; those a Hugging Face tokenizer lacks are added to it
    (``add_missing``)."""
    good, bad = reward_tokens
    found = [single_token_id(tokenizer, text, argument, add_missing) for text, argument in (
        (placeholder_token, "placeholder_token"), (good, "reward_tokens[0] (good)"), (bad, "reward_tokens[1] (bad)"))]
    ids = SpecialTokenIds(
        placeholder=found[0][0], good=found[1][0], bad=found[2][0],
        added=tuple(text for text, (_, added) in zip((placeholder_token, good, bad), found) if added),
        placeholder_text=placeholder_token,
    )
    if len({ids.placeholder, ids.good, ids.bad}) != 3:
        raise TokenizerError(
            f"placeholder_token and reward_tokens must map to three different ids, got {ids}"
        )
    return ids


def save_with_special_tokens(directory: Path, placeholder_token: str, reward_tokens: list[str]) -> tuple[str, ...]:
    """Add the step tag and reward tokens that the HF tokenizer saved in ``directory`` lacks, and save it
    there again (a checkpoint's tokenizer then holds the ids its model was trained with); returns the
    tokens added."""
    if not any((directory / name).is_file() for name in HF_TOKENIZER_FILES):
        return ()  # a SentencePiece model: nothing can have been added
    tokenizer = HFTokenizer(directory)
    added = special_token_ids(tokenizer, placeholder_token, reward_tokens).added
    if added:
        tokenizer.save(directory)
    return added
