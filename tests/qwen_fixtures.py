"""Tiny Qwen-family test material built locally (no hub): a Qwen2-style byte-level BPE tokenizer directory
and a Qwen2.5-Math-PRM-style checkpoint (Qwen2Model + the ``score`` MLP), written as their published
counterparts are laid out."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ENDOFTEXT = "<|endoftext|>"
# Text the tokenizer learns its merges from: the kind of text PRM records hold.
CORPUS = [
    "Step 1: Janet has 16 eggs and eats 3, so 16 - 3 = 13 eggs are left.",
    "Step 2: She bakes with 4, leaving 13 - 4 = 9, which she sells for $2 each: 9 * 2 = 18 dollars.",
    "The answer is 18. A train travels 60 miles per hour for 3 hours + 2 more hours.",
    "Let x be the number of apples; then 2x + 5 = 17, so x = 6. Therefore the final answer is 6.",
] * 4


# Qwen2.5-Math's ChatML template (its tokenizer_config.json, less the tool-calling branches): a system
# message (a default one when the conversation has none), then each turn between <|im_start|> and <|im_end|>.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def write_qwen2_tokenizer(directory: Path, vocab_size: int = 420, extra_special: tuple[str, ...] = (),
                          chat: bool = False) -> Path:
    """A byte-level BPE ``tokenizer.json`` + ``tokenizer_config.json`` as Qwen2 ships them (ByteLevel
    pre-tokenizer and decoder, ``<|endoftext|>`` as EOS and padding), with ``extra_special`` added as
    special tokens (Qwen2.5-Math-PRM's ``<extra_0>``); with ``chat``, the ChatML tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    special = [ENDOFTEXT, *(CHATML_TOKENS if chat else ()), *extra_special]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "bos_token": None,
        "model_max_length": 4096, "clean_up_tokenization_spaces": False,
        **({"chat_template": CHATML_TEMPLATE} if chat else {}),
    }))
    return directory


def qwen2_prm_reference(directory: Path):
    """Load a checkpoint written by :func:`write_qwen2_prm` the way Qwen2.5-Math-PRM's remote code builds
    it (Qwen2Model + ``score``), without running any remote code: ``(base model, score MLP)``."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config.from_pretrained(directory)
    base, score = Qwen2Model(config).float().eval(), _score_mlp(config.hidden_size)
    weights = {}
    for file in directory.glob("*.safetensors"):
        weights.update(load_file(file))
    base.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
    score.load_state_dict({k[len("score."):]: v for k, v in weights.items() if k.startswith("score.")})
    return base, score.float().eval()


def _score_mlp(hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))


def write_qwen2_prm(directory: Path, vocab_size: int, **shape) -> Path:
    """A Qwen2.5-Math-PRM-style checkpoint: ``model.*`` of a Qwen2Model, ``score.0`` / ``score.2`` and
    no LM head, ``architectures: [Qwen2ForProcessRewardModel]`` (the published config also names its
    remote code in ``auto_map``, which this project never runs)."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(vocab_size=vocab_size, **shape)
    base, score = Qwen2Model(config), _score_mlp(config.hidden_size)
    with torch.no_grad():
        for param in [*base.parameters(), *score.parameters()]:
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    tensors = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    tensors.update({f"score.{k}": v.contiguous() for k, v in score.state_dict().items()})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    saved = {**config.to_dict(), "dtype": "float32", "architectures": ["Qwen2ForProcessRewardModel"],
             "auto_map": {"AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}}
    (directory / "config.json").write_text(json.dumps(saved, indent=2))
    return directory
