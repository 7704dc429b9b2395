"""Typed run configuration: the original PRM recipe's argument names and defaults.

A run is configured by one flat mapping of argument names to values, read from a JSON or YAML file
and then overridden by ``--name value`` pairs on the command line, as in the recipe's
``run_reward.py config.json``. Each name belongs to exactly one of the sections below; the sections
exist to keep each module's inputs small, not to change how users spell things.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_prm.option_ranges import MAX_SEQ_LEN

DEFAULT_MAX_SEQ_LEN = 4096
# How records become ids (megatron_prm/data/whole_text.py): the default of a new run, and the mode of
# checkpoints and stores written before the setting existed. per_step stays the default: on the demo
# whole_text trained to lower figures (README, "Data format").
WHOLE_TEXT, PER_STEP = "whole_text", "per_step"
TOKENIZATIONS = (WHOLE_TEXT, PER_STEP)
DEFAULT_TOKENIZATION = PER_STEP
LEGACY_TOKENIZATION = PER_STEP
# numpy's and torch's generators take a 32-bit seed.
SEED_RANGE = (0, 2**32 - 1)

class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and, where known, the file."""


def _doc(text: str, **kwargs) -> Any:
    """A dataclass field whose help text lives in its metadata (shown by ``--help`` and the README)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PRMArguments:
    """How steps are marked and labelled."""

    process_reward: bool = _doc(
        "Train on every step's label (PRM). False trains only each record's last step (ORM).",
        default=True,
    )
    placeholder_token: str = _doc(
        "Token appended after every response step; the reward is read at its position. Must "
        "tokenize to exactly one id.",
        default="ки",
    )
    reward_tokens: str = _doc(
        "Comma-separated good and bad reward tokens; their LM-head logits form the classifier. Each "
        "must tokenize to exactly one id.",
        default="+,-",
    )
    score_threshold: float = _doc(
        "A step is judged correct when P(good) >= this; used by step accuracy and first-error metrics.",
        default=0.5,
    )
    reward_head: str = _doc(
        "'lm_head': the LM-head logits of the reward tokens form the classifier. 'mlp': Qwen2.5-Math-PRM's "
        "head (Linear h->h, ReLU, Linear h->2) on the final hidden states, replicated on every tensor-parallel "
        "rank; a checkpoint converted from such a PRM needs it.",
        default="lm_head",
    )

    def __post_init__(self) -> None:
        tokens = self.reward_token_list
        if len(tokens) != 2 or not all(tokens) or tokens[0] == tokens[1]:
            raise ConfigError(
                f"reward_tokens must name two different tokens separated by a comma (good,bad), "
                f"got {self.reward_tokens!r}"
            )
        if self.placeholder_token in tokens:
            raise ConfigError(
                f"placeholder_token {self.placeholder_token!r} must differ from reward_tokens "
                f"{self.reward_tokens!r}"
            )
        if not self.placeholder_token.strip():
            raise ConfigError(f"placeholder_token must not be empty or blank, got {self.placeholder_token!r}")
        if not 0.0 < self.score_threshold < 1.0:
            raise ConfigError(f"score_threshold must lie in (0, 1), got {self.score_threshold}")
        if self.reward_head not in ("lm_head", "mlp"):
            raise ConfigError(f"reward_head must be 'lm_head' or 'mlp', got {self.reward_head!r}")

    @property
    def reward_token_list(self) -> list[str]:
        """``[good, bad]``."""
        return self.reward_tokens.split(",")


@dataclass
class DataArguments:
    """Where the records are and how they become token sequences."""

    train_dataset_path: str = _doc(
        "Training records: a JSON array or JSONL of {src, tgt, responses, labels}, or the prefix of a "
        "store written by `megatron-prm preprocess`.",
        default="./data/train.jsonl",
    )
    dev_dataset_path: Optional[str] = _doc(
        "Evaluation records, in either form; null (the default) runs no evaluation. A path that does not "
        "exist is an error.",
        default=None,
    )
    max_seq_len: int = _doc(
        "Longest token sequence; trailing steps that do not fit are dropped with their labels. At most the "
        "model's max_position_embeddings.",
        default=DEFAULT_MAX_SEQ_LEN,
    )
    max_prompt_len: Optional[int] = _doc(
        "Longest prompt (all turns before the response); a longer prompt keeps its end. Default: "
        "max_seq_len // 2.",
        default=None,
    )
    skip_invalid: bool = _doc(
        "Skip and count malformed records instead of stopping at the first one.", default=False
    )
    apply_chat_template: bool = _doc(
        "Build the prompt with the tokenizer's chat template (an HF tokenizer that has one): system_prompt, "
        "then src/tgt as user/assistant turns; the steps, each ended by the step tag, are the content of the "
        "last assistant turn. How chat PRMs such as Qwen2.5-Math-PRM are scored. False: BOS + the plain turns.",
        default=False,
    )
    system_prompt: Optional[str] = _doc(
        "With apply_chat_template: the system message, as the PRM was trained with it (Qwen2.5-Math-PRM's "
        "model card gives its own); null: no system message of ours (a template may add its own default).",
        default=None,
    )
    tokenization: Optional[str] = _doc(
        "'whole_text': each record is rendered once as text (prompt, then every step followed by the step "
        "tag) and tokenized whole, as a serving engine sent that text does; a record whose tags do not "
        "become one tag id each is refused (counted under skip_invalid). 'per_step': the prompt and each "
        "step tokenized apart, the tag id appended after each step (a serving engine must then be sent ids). "
        "null: per_step for a new run, and for a resumed run or a scored checkpoint the mode it was trained "
        "with (per_step if it predates this key).",
        default=None,
    )
    zero_padding: bool = _doc(
        "Pack samples in arrival order into rows of max_seq_len tokens, fed as THD sequences (no "
        "attention across samples); per_device_train_batch_size then counts rows and must be 1.",
        default=False,
    )
    greedy_zero_padding: bool = _doc(
        "Pack with best-fit decreasing over buffers of packing_buffer_size samples (fuller rows than "
        "zero_padding); the rows are then shuffled.",
        default=False,
    )
    packing_buffer_size: int = _doc(
        "Samples per best-fit-decreasing buffer (greedy_zero_padding); with lazy, every packing mode packs "
        "the stream one buffer at a time (a resume re-reads at most one buffer).",
        default=1000,
    )
    lazy: bool = _doc(
        "Stream the training JSONL, tokenizing on the fly, instead of loading it: for data larger than "
        "memory. No global shuffle (see shuffle_buffer_size); needs max_steps.",
        default=False,
    )
    shuffle_buffer_size: int = _doc("With lazy: samples each reader shuffles among.", default=10000)
    dataloader_num_workers: int = _doc(
        "With lazy: DataLoader worker processes that tokenize (0: in the training process).", default=0
    )

    @property
    def packing_mode(self) -> Optional[str]:
        if self.greedy_zero_padding:
            return "greedy_zero_padding"
        return "zero_padding" if self.zero_padding else None

    def __post_init__(self) -> None:
        if self.packing_buffer_size < 1:
            raise ConfigError(f"packing_buffer_size must be at least 1, got {self.packing_buffer_size}")
        if self.shuffle_buffer_size < 1 or self.dataloader_num_workers < 0:
            raise ConfigError("shuffle_buffer_size must be at least 1 and dataloader_num_workers at least 0")
        if not 2 <= self.max_seq_len <= MAX_SEQ_LEN:
            raise ConfigError(f"max_seq_len must lie in [2, {MAX_SEQ_LEN}], got {self.max_seq_len}")
        if self.system_prompt is not None and not self.apply_chat_template:
            raise ConfigError("system_prompt is used only with apply_chat_template true (--system_prompt null drops "
                              "one taken over from a checkpoint)")
        if self.tokenization is not None and self.tokenization not in TOKENIZATIONS:
            raise ConfigError(f"tokenization must be one of {', '.join(TOKENIZATIONS)} (or null), got "
                              f"{self.tokenization!r}")
        if self.max_prompt_len is None:
            self.max_prompt_len = self.max_seq_len // 2
        if not 1 <= self.max_prompt_len < self.max_seq_len:
            raise ConfigError(
                f"max_prompt_len ({self.max_prompt_len}) must be at least 1 and below max_seq_len "
                f"({self.max_seq_len}) so that at least one step can follow the prompt"
            )


# rope_scaling fields that must be positive numbers where present (HF names).
_ROPE_POSITIVE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
                  "beta_slow")


def check_rope_scaling(value: Any) -> Optional[str]:
    """What is wrong with an HF ``rope_scaling`` dict's numbers (None: nothing): factors and lengths must be
    positive, finite numbers."""
    if not isinstance(value, dict):
        return f"must be a mapping, got {type(value).__name__}"
    for name in _ROPE_POSITIVE:
        number = value.get(name)
        if number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number <= 0:
            return f"{name} must be a positive number, got {number!r}"
    return None


@dataclass
class ModelArguments:
    """The architecture (Llama, Mistral, Qwen2/2.5, Qwen3; Hugging Face names), the starting weights and the
    tokenizer.

    The shape comes from ``model_name_or_path`` (a checkpoint), ``model_config`` (an HF ``config.json``)
    or the shape fields; a field given in two places must agree. Without ``model_name_or_path`` the
    weights start from a random initialisation.
    """

    model_name_or_path: Optional[str] = _doc(
        "Where to start from: a megatron-prm checkpoint (an iter_XXXXXXX directory, or a run directory whose "
        "`latest` names one), in any parallel layout; or an HF model directory or Hub ID, imported once into "
        "output_dir/base_model.",
        default=None,
    )
    tokenizer_name_or_path: Optional[str] = _doc(
        "An HF tokenizer directory or Hub ID, a SentencePiece .model file, or "
        "'mistral-common:tokenizer.model.v1' (the Mistral-7B v0.1 tokenizer shipped by mistral-common); "
        "default: the starting checkpoint's, else the tokenizer of the HF model model_config names.",
        default=None,
    )
    model_config: Optional[str] = _doc(
        "An HF config.json (model_type llama, mistral, qwen2 or qwen3), a directory with one, or a Hub ID, "
        "giving the shape.",
        default=None,
    )
    num_hidden_layers: Optional[int] = _doc("Transformer layers.", default=None)
    hidden_size: Optional[int] = _doc("Hidden size.", default=None)
    intermediate_size: Optional[int] = _doc("SwiGLU inner size.", default=None)
    num_attention_heads: Optional[int] = _doc("Query heads.", default=None)
    num_key_value_heads: Optional[int] = _doc(
        "Key/value heads (grouped-query attention); default: num_attention_heads.", default=None
    )
    head_dim: Optional[int] = _doc("Per-head size; default hidden_size / num_attention_heads.", default=None)
    vocab_size: Optional[int] = _doc("Vocabulary size; default: the tokenizer's.", default=None)
    max_position_embeddings: Optional[int] = _doc("Longest position the model is built for.", default=None)
    rope_theta: Optional[float] = _doc("RoPE base (Llama 3: 500000).", default=None)
    rope_scaling: Optional[dict] = _doc(
        "HF rope_scaling: rope_type 'llama3' (Llama 3.1+), 'linear' or 'yarn' (Qwen2.5 / Qwen3 long context); "
        "other types are refused.", default=None
    )
    rms_norm_eps: Optional[float] = _doc("RMSNorm epsilon.", default=None)
    tie_word_embeddings: Optional[bool] = _doc("Share the input embedding and the LM head.", default=None)
    initializer_range: Optional[float] = _doc("Std of the normal weight initialisation.", default=None)

    def __post_init__(self) -> None:
        for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 (or null), got {value}")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive (or null), got {value}")
        heads, groups = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and groups is not None and heads % groups:
            raise ConfigError(f"num_attention_heads {heads} must be a multiple of num_key_value_heads {groups}")
        if self.head_dim is None and heads is not None and self.hidden_size is not None and self.hidden_size % heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {heads}: set "
                              "head_dim, or a head count that divides the hidden size")
        head_dim = self.head_dim or (self.hidden_size // heads if heads and self.hidden_size else None)
        if head_dim is not None and head_dim % 2:
            raise ConfigError(f"the head dimension {head_dim} is odd; rotary embeddings rotate pairs of channels, so "
                              "it must be even")
        if self.rope_scaling is not None:
            rope_scaling_problem = check_rope_scaling(self.rope_scaling)
            if rope_scaling_problem:
                raise ConfigError(f"rope_scaling: {rope_scaling_problem}")


CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")


@dataclass
class ParallelArguments:
    """How the model and the work are split over processes, and what is recomputed."""

    tensor_parallel_degree: int = _doc("Tensor-parallel size (splits heads, FFN and vocabulary).", default=1)
    pipeline_parallel_degree: int = _doc("Pipeline-parallel size (splits the layers).", default=1)
    context_parallel_degree: int = _doc(
        "Context-parallel size: every sequence is split over this many ranks (2 x CP chunks in Megatron's "
        "load-balanced order), for long reasoning traces whose activations do not fit one GPU.",
        default=1,
    )
    cp_comm_type: str = _doc(
        "With context_parallel_degree > 1 and Transformer Engine: how attention exchanges keys and values "
        "('p2p' ring, 'a2a' all-to-all, 'all_gather', 'a2a+p2p'; Megatron-Core's cp_comm_type). Without TE the "
        "package's own attention all-gathers them.",
        default="p2p",
    )
    expert_parallel_degree: int = _doc(
        "Mixture-of-Experts models: each rank holds num_experts / this many experts of every layer, and "
        "tokens travel to their experts by all-to-all (Megatron-Core's expert_model_parallel_size). The "
        "expert-parallel ranks are drawn from the data-parallel ones: the world size must be divisible by "
        "expert_parallel_degree x expert_tensor_parallel_degree x pipeline_parallel_degree.",
        default=1,
    )
    expert_tensor_parallel_degree: int = _doc(
        "Mixture-of-Experts models: tensor-parallel size within each expert; -1: tensor_parallel_degree "
        "(Megatron-Core's default).",
        default=-1,
    )
    virtual_pp_degree: int = _doc(
        "Model chunks per pipeline rank (interleaved schedule); needs pipeline_parallel_degree > 1.", default=1
    )
    sequence_parallel: bool = _doc(
        "Split norms, dropout and activations along the sequence over the tensor-parallel ranks.", default=False
    )
    sharding: str = _doc(
        "'' or 'stage1': Megatron's distributed optimizer (optimizer state and fp32 master weights "
        "sharded over data parallel, gradients reduce-scattered). 'stage2' and 'stage3' are refused: "
        "Megatron-Core keeps every rank's full gradient buffer and all parameters, so they would run as stage1.",
        default="",
    )
    sharding_parallel_degree: int = _doc(
        "Ranks the optimizer state is sharded over: -1 or the data-parallel size (derived from the "
        "world size: world / (tensor x pipeline)).",
        default=-1,
    )
    overlap_grad_reduce: bool = _doc(
        "Overlap the data-parallel gradient reduction with the backward pass (Megatron DDP's "
        "overlap_grad_reduce: buckets are all-reduced / reduce-scattered as their gradients are ready).",
        default=False,
    )
    overlap_param_gather: bool = _doc(
        "With sharding stage1 and overlap_grad_reduce: all-gather the updated parameters during the next "
        "forward pass instead of after the optimizer step (Megatron's overlap_param_gather).",
        default=False,
    )
    tp_comm_overlap: bool = _doc(
        "Overlap tensor-parallel communication with the GEMMs (Transformer Engine userbuffers); needs TE, "
        "tensor_parallel_degree > 1 and sequence_parallel.",
        default=False,
    )
    recompute: bool = _doc("Recompute activations in the backward pass instead of storing them.", default=False)
    recompute_granularity: str = _doc(
        "'full': whole layers (see recompute_method); 'full_attn': the attention block; 'core_attn': "
        "the attention core (softmax(QK)V).",
        default="full",
    )
    recompute_method: str = _doc(
        "With full recompute: 'uniform' (every group of recompute_num_layers layers) or 'block' (the "
        "first recompute_num_layers layers of each pipeline stage).",
        default="uniform",
    )
    recompute_num_layers: int = _doc("Layers per recompute group (uniform) or recomputed layers (block).", default=1)

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree", "virtual_pp_degree",
                     "recompute_num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.expert_parallel_degree < 1:
            raise ConfigError(f"expert_parallel_degree must be at least 1, got {self.expert_parallel_degree}")
        if self.expert_tensor_parallel_degree != -1 and self.expert_tensor_parallel_degree < 1:
            raise ConfigError("expert_tensor_parallel_degree must be -1 (tensor_parallel_degree) or at least 1, "
                              f"got {self.expert_tensor_parallel_degree}")
        if self.sharding in ("stage2", "stage3"):
            raise ConfigError(
                f"sharding {self.sharding!r} is not supported: Megatron-Core's distributed optimizer (stage1) "
                "shards the optimizer state and reduce-scatters gradients but keeps every rank's full gradient "
                f"buffer{'' if self.sharding == 'stage2' else ' and all parameters'}, so {self.sharding} would "
                "silently run as stage1; use sharding: stage1 (with tensor/pipeline parallelism for models that "
                "do not fit)"
            )
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ConfigError(f"cp_comm_type must be one of {', '.join(map(repr, CP_COMM_TYPES))}, got {self.cp_comm_type!r}")
        if self.sharding not in ("", "stage1"):
            raise ConfigError(f"sharding must be '' or 'stage1', got {self.sharding!r}")
        if self.recompute_granularity not in ("full", "full_attn", "core_attn"):
            raise ConfigError(
                f"recompute_granularity must be 'full', 'full_attn' or 'core_attn', got {self.recompute_granularity!r}"
            )
        if self.recompute_method not in ("uniform", "block"):
            raise ConfigError(f"recompute_method must be 'uniform' or 'block', got {self.recompute_method!r}")
        if self.virtual_pp_degree > 1 and self.pipeline_parallel_degree == 1:
            raise ConfigError("virtual_pp_degree > 1 needs pipeline_parallel_degree > 1")
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            raise ConfigError("overlap_param_gather needs sharding: stage1 (the distributed optimizer) and "
                              "overlap_grad_reduce: true")
        if self.tp_comm_overlap and not (self.tensor_parallel_degree > 1 and self.sequence_parallel):
            raise ConfigError("tp_comm_overlap needs tensor_parallel_degree > 1 and sequence_parallel: true")

    @property
    def use_distributed_optimizer(self) -> bool:
        return self.sharding == "stage1"


@dataclass
class TrainingArguments:
    """Optimisation, schedule, evaluation and logging."""

    output_dir: str = _doc("Run directory: resolved config, logs, checkpoints.", default="./output")
    overwrite_output_dir: bool = _doc(
        "Let a fresh run start in a non-empty output_dir. Nothing is deleted: the earlier files move into "
        "output_dir/earlier_run_<UTC time>/.", default=False,
    )
    device: str = _doc(
        "'auto' (GPU when present, else the CPU mode), 'cuda' or 'cpu'. The CPU mode runs Megatron-Core "
        "with gloo and is meant for tests and tiny models.",
        default="auto",
    )
    seed: int = _doc("Seed of initialisation, shuffling and dropout.", default=42)
    do_train: bool = _doc("Run training.", default=True)
    do_eval: bool = _doc("Evaluate on dev_dataset_path (every eval_steps and at the end).", default=True)
    learning_rate: float = _doc("Peak learning rate.", default=1e-6)
    min_learning_rate: float = _doc("Learning rate at the end of the decay.", default=0.0)
    lr_scheduler_type: str = _doc("'linear', 'cosine' or 'constant' decay after warmup.", default="linear")
    warmup_steps: int = _doc("Linear warmup, in optimizer steps.", default=0)
    weight_decay: float = _doc("Decoupled (AdamW) weight decay.", default=0.0)
    adam_beta1: float = _doc("Adam beta1.", default=0.9)
    adam_beta2: float = _doc("Adam beta2.", default=0.999)
    adam_epsilon: float = _doc("Adam epsilon.", default=1e-8)
    max_grad_norm: float = _doc("Global gradient-norm clip; 0 disables clipping.", default=1.0)
    per_device_train_batch_size: int = _doc("Micro batch size.", default=1)
    per_device_eval_batch_size: int = _doc("Micro batch size for evaluation.", default=1)
    gradient_accumulation_steps: int = _doc(
        "Microbatches per optimizer step; global batch = micro batch x this x data-parallel size.",
        default=8,
    )
    num_train_epochs: float = _doc("Epochs, when max_steps is not positive.", default=3.0)
    max_steps: int = _doc("Optimizer steps; overrides num_train_epochs when positive.", default=-1)
    eval_steps: int = _doc("Evaluate every this many optimizer steps.", default=100)
    save_strategy: str = _doc("'steps' (every save_steps), 'epoch' (every epoch) or 'no'; also at the end "
                              "unless 'no'.", default="steps")
    save_steps: int = _doc("With save_strategy steps: save a checkpoint every this many optimizer steps.",
                           default=500)
    save_total_limit: Optional[int] = _doc(
        "Keep at most this many checkpoints (the best one is never removed); null keeps all.", default=None
    )
    unified_checkpoint: bool = _doc(
        "With the distributed optimizer (sharding: stage1): save its state fully reshardable at every save, so "
        "that a resume may change tensor/pipeline layout directly. It gathers the whole optimizer state on "
        "data-parallel rank 0 at each save (about 12 bytes per parameter of a model-parallel shard: for "
        "small runs only). Off (the default), every rank writes its own share, nothing is gathered, and a "
        "checkpoint changes tensor/pipeline layout after `megatron-prm reshard`. Model weights load under any "
        "layout in both cases.",
        default=False,
    )
    async_save: bool = _doc(
        "Write checkpoints in the background: training pauses only while a save is staged; the checkpoint is "
        "published (manifest, `latest`, pruning) at a later step, once every rank has written its files.",
        default=False,
    )
    resume_from_checkpoint: Optional[str] = _doc(
        "Continue a run: a checkpoint directory, a run directory (its `latest`), 'latest' for "
        "output_dir's, or 'auto' (output_dir's latest if there is one, else a fresh start: for requeued "
        "jobs). Restores model, optimizer, LR schedule, RNG and the data position.",
        default=None,
    )
    verify_checkpoint_checksums: bool = _doc(
        "Check every file of a checkpoint against its manifest's CRC-32 before loading it (sizes and the "
        "format version are always checked).", default=True,
    )
    moe_aux_loss_coeff: Optional[float] = _doc(
        "Mixture-of-Experts bases: coefficient c of the load-balancing loss, transformers' load_balancing_loss_func "
        "(every layer's routing pooled, padding excluded); c x its mean over the step's micro batches is added to "
        "the PRM loss, as the HF models add router_aux_loss_coef x it to theirs. null: the base model's "
        "router_aux_loss_coef; 0: off. Under pipeline parallelism, where no stage holds every layer, Megatron-Core's "
        "per-layer aux_loss (summed over the layers) with this coefficient instead, with a note.",
        default=None,
    )
    moe_z_loss_coeff: float = _doc(
        "Mixture-of-Experts bases: coefficient of the router z-loss (ST-MoE; Megatron-Core's moe_z_loss_coeff, one "
        "per layer, summed; Megatron-Core weights each micro batch's term by its tokens, so relative to the PRM "
        "loss it weighs coefficient x tokens per labelled step); 0: off.", default=0.0,
    )
    max_skipped_nonfinite_steps: int = _doc(
        "Optimizer steps with a non-finite loss or gradient that may be skipped (no update) before the run "
        "stops with an error; 0 stops at the first. Counted over the whole run, resumes included. Nothing "
        "non-finite is ever saved.", default=0,
    )
    load_best_model_at_end: bool = _doc(
        "Track the checkpoint with the best metric_for_best_model and load it at the end.", default=False
    )
    export_hf_dir: Optional[str] = _doc(
        "After training, export the final model (the best one with load_best_model_at_end) here as an HF model "
        "directory, as `megatron-prm convert-hf export` writes it; it must not exist yet or be empty.",
        default=None,
    )
    metric_for_best_model: str = _doc(
        "Eval metric that ranks checkpoints: loss, accuracy, neg_f1, auroc, first_error_f1, ...", default="loss"
    )
    greater_is_better: Optional[bool] = _doc(
        "Whether a larger metric_for_best_model is better; default: false for loss, true otherwise.", default=None
    )
    logging_steps: int = _doc("Log loss, learning rate, grad norm and tokens/s every this many steps.", default=1)
    bf16: bool = _doc("bfloat16 parameters and compute with fp32 master weights.", default=True)
    fp16: bool = _doc("float16 parameters and compute with dynamic loss scaling.", default=False)
    fp16_opt_level: str = _doc(
        "With fp16: 'O2' float16 throughout with fp32 master weights (Megatron's mixed precision); 'O1' "
        "keeps the residual stream, softmax and gradient reduction in fp32.",
        default="O2",
    )
    scale_loss: float = _doc("Initial dynamic loss scale for fp16.", default=32768.0)
    fp8: Optional[str] = _doc(
        "Transformer Engine FP8 format, 'e4m3' or 'hybrid' (needs TE on a GPU); null disables FP8.", default=None
    )
    fp8_recipe: str = _doc("Transformer Engine FP8 recipe: 'delayed', 'tensorwise', 'mxfp8' or 'blockwise'.",
                           default="delayed")
    fp8_amax_history_len: int = _doc("FP8 delayed scaling: amax history length.", default=1024)
    fp8_amax_compute_algo: str = _doc("FP8 delayed scaling: 'max' or 'most_recent'.", default="max")
    tensorboard_dir: Optional[str] = _doc("Write TensorBoard scalars here.", default=None)
    report_to: Optional[str] = _doc(
        "Experiment trackers besides log.jsonl, comma-separated: 'tensorboard' (into tensorboard_dir, default "
        "output_dir/tensorboard), 'wandb' (Weights & Biases; pip install 'megatron-prm[wandb]'; WANDB_MODE=offline "
        "works without a network). A resumed run continues the same tracker run.",
        default=None,
    )
    run_name: Optional[str] = _doc("Name of the run in the trackers; default: output_dir's name.", default=None)
    peak_tflops: Optional[float] = _doc(
        "Peak dense TFLOP/s of one accelerator for the MFU figure; default: looked up by GPU name (H100/H200 "
        "989, A100 312 in bf16), none on CPU.",
        default=None,
    )

    def __post_init__(self) -> None:
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(f"seed must lie in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"device must be 'auto', 'cuda' or 'cpu', got {self.device!r}")
        if self.lr_scheduler_type not in ("linear", "cosine", "constant"):
            raise ConfigError(
                f"lr_scheduler_type must be 'linear', 'cosine' or 'constant', got {self.lr_scheduler_type!r}"
            )
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both true; choose one")
        unknown_trackers = set(self.trackers) - {"tensorboard", "wandb"}
        if unknown_trackers:
            raise ConfigError(f"report_to: unknown tracker(s) {', '.join(sorted(unknown_trackers))}; choose from "
                              "tensorboard, wandb")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"peak_tflops must be positive, got {self.peak_tflops}")
        if self.fp16_opt_level not in ("O1", "O2"):
            raise ConfigError(f"fp16_opt_level must be 'O1' or 'O2', got {self.fp16_opt_level!r}")
        if self.fp8 not in (None, "e4m3", "hybrid"):
            raise ConfigError(f"fp8 must be null, 'e4m3' or 'hybrid', got {self.fp8!r}")
        if self.fp8 and not (self.bf16 or self.fp16):
            raise ConfigError("fp8 needs bf16 or fp16 for the operations that stay in higher precision")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon <= 0:
            raise ConfigError(f"adam_epsilon must be positive, got {self.adam_epsilon}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must not be negative (0 disables clipping), got {self.max_grad_norm}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must not be negative, got {self.weight_decay}")
        if self.scale_loss <= 0:
            raise ConfigError(f"scale_loss must be positive, got {self.scale_loss}")
        if Path(self.output_dir).is_file():
            raise ConfigError(f"output_dir {self.output_dir!r} is a file, not a directory")
        if self.tensorboard_dir is not None and Path(self.tensorboard_dir).is_file():
            raise ConfigError(f"tensorboard_dir {self.tensorboard_dir!r} is a file, not a directory")
        if not 0.0 <= self.min_learning_rate <= self.learning_rate:
            raise ConfigError(
                f"min_learning_rate ({self.min_learning_rate}) must lie in [0, learning_rate "
                f"({self.learning_rate})]"
            )
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "eval_steps", "save_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"{name} must not be negative, got {value}")
        if self.max_skipped_nonfinite_steps < 0:
            raise ConfigError(f"max_skipped_nonfinite_steps must not be negative, got {self.max_skipped_nonfinite_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must not be negative, got {self.warmup_steps}")
        if 0 < self.max_steps <= self.warmup_steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps or num_train_epochs to a positive value")
        if self.save_strategy not in ("steps", "epoch", "no"):
            raise ConfigError(f"save_strategy must be 'steps', 'epoch' or 'no', got {self.save_strategy!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be at least 1 or null, got {self.save_total_limit}")
        if self.load_best_model_at_end:
            if not self.do_eval or self.save_strategy == "no":
                raise ConfigError("load_best_model_at_end needs do_eval and a save_strategy other than 'no'")
            if self.save_strategy == "steps" and self.save_steps % self.eval_steps:
                raise ConfigError(
                    f"load_best_model_at_end needs save_steps ({self.save_steps}) to be a multiple of eval_steps "
                    f"({self.eval_steps}) so that every checkpoint has an evaluation"
                )

    @property
    def trackers(self) -> list[str]:
        """The trackers of ``report_to`` ('none' and empty entries dropped); TensorBoard also when
        ``tensorboard_dir`` is set."""
        names = [n.strip() for n in (self.report_to or "").split(",") if n.strip() and n.strip() != "none"]
        if self.tensorboard_dir and "tensorboard" not in names:
            names.append("tensorboard")
        return names

    @property
    def best_is_greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return self.metric_for_best_model != "loss"


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "prm": PRMArguments,
    "parallel": ParallelArguments,
    "training": TrainingArguments,
}


@dataclass
class RunConfig:
    """All arguments of a run, one dataclass per section."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    prm: PRMArguments = field(default_factory=PRMArguments)
    parallel: ParallelArguments = field(default_factory=ParallelArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)

    def __post_init__(self) -> None:
        """The rules that tie sections together (each section checks its own values)."""
        data, training = self.data, self.training
        longest = self.model.max_position_embeddings
        if longest is not None and data.max_seq_len > longest:
            raise ConfigError(f"max_seq_len {data.max_seq_len} exceeds max_position_embeddings {longest}")
        mode = data.packing_mode
        if mode is not None and training.per_device_train_batch_size != 1:
            raise ConfigError(
                f"with {mode} a micro batch is one packed row: set per_device_train_batch_size to 1 (got "
                f"{training.per_device_train_batch_size}) and raise gradient_accumulation_steps instead"
            )
        if data.lazy:
            from megatron_prm.data.store import store_prefix  # the data package imports this module

            if training.do_train and training.max_steps <= 0:
                raise ConfigError(f"lazy=True streams the data without counting it first: set max_steps (got "
                                  f"{training.max_steps})")
            if training.save_strategy == "epoch":
                raise ConfigError("save_strategy 'epoch' needs a known epoch length; a streamed (lazy) data set "
                                  "has none: use save_strategy 'steps'")
            if store_prefix(data.train_dataset_path) is not None:
                raise ConfigError(f"lazy=True streams JSONL; train_dataset_path {data.train_dataset_path!r} is a "
                                  "preprocessed store, which is already read lazily (set lazy=false)")

    def to_flat_dict(self) -> dict[str, Any]:
        """The flat ``name: value`` mapping that :func:`load_config` reads back."""
        flat: dict[str, Any] = {}
        for section in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat

    def save(self, path: str | Path) -> None:
        """Write the resolved config as JSON (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_flat_dict(), indent=2, ensure_ascii=False) + "\n")
        tmp.replace(path)


def _field_owner() -> dict[str, tuple[str, dataclasses.Field]]:
    owner: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in owner, f"argument {f.name} defined twice"
            owner[f.name] = (section, f)
    return owner


ARGUMENTS = _field_owner()


def _resolved_type(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def argument_type_name(name: str) -> str:
    """The type of argument ``name`` as users write it: ``int``, ``float or null``, ..."""
    section, _ = ARGUMENTS[name]
    base, optional = _unwrap_optional(_resolved_type(section, name))
    kind = getattr(base, "__name__", str(base))
    return f"{kind} or null" if optional else kind


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(name: str, value: Any, tp: Any, where: str) -> Any:
    """Convert a file or command-line value to the field's type, or raise a ConfigError."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: {name} must not be null")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value)
            raise ValueError
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, (int, float, str)) else None
            if number is None:
                raise ValueError
            if not math.isfinite(number):
                raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
            return number
        if base is str:
            if isinstance(value, str):
                return value
            raise ValueError
        if base is dict:
            if isinstance(value, dict):
                return value
            if isinstance(value, str):
                parsed = json.loads(value)
                if isinstance(parsed, dict):
                    return parsed
            raise ValueError
    except ConfigError:
        raise
    except ValueError:
        pass
    kind = getattr(base, "__name__", str(base))
    raise ConfigError(f"{where}: {name} must be {kind}{' or null' if optional else ''}, got {value!r}")


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(ARGUMENTS), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see the argument table in README.md"
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat mapping from a JSON or YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:  # one line: what and where, without the caret drawing
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = "; ".join(part for part in (err.context, err.problem) if part)
        raise ConfigError(f"{path}: not valid YAML{where}: {what} (a config is one mapping of names to values)") from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {kind}: {' '.join(str(err).split())}") from None
    except (RecursionError, ValueError) as err:  # nested past the recursion limit, an integer of too many digits
        problem = "nested too deeply" if isinstance(err, RecursionError) else " ".join(str(err).split())[:120]
        raise ConfigError(f"{path}: not a readable {kind} config: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of argument names to values")
    return data


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """``["--name", "value", "--flag=true"]`` -> ``{"name": "value", "flag": "true"}``.

    A bare ``--flag`` followed by another ``--option`` (or nothing) means ``true``.
    Dashes in names are read as underscores.
    """
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"command line: expected --name value, got {token!r}")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        overrides[name.replace("-", "_")] = value
        i += 1
    return overrides


def build_config(values: dict[str, Any], where: str = "config") -> RunConfig:
    """Build a RunConfig from a flat mapping, checking names and types."""
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in values.items():
        if key not in ARGUMENTS:
            raise _unknown_key_error(key, where)
        section, f = ARGUMENTS[key]
        per_section[section][key] = _coerce(key, value, _resolved_type(section, key), where)
    try:
        return RunConfig(**{s: SECTIONS[s](**kw) for s, kw in per_section.items()})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_config(path: Optional[str | Path] = None, argv: Optional[list[str]] = None) -> RunConfig:
    """File values first, then command-line overrides; unknown names are errors."""
    values: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        file_values = read_config_file(path)
        for key in file_values:
            if key not in ARGUMENTS:
                raise _unknown_key_error(key, str(path))
        values.update(file_values)
        where = f"{path} + command line"
    overrides = parse_overrides(argv or [])
    for key in overrides:
        if key not in ARGUMENTS:
            raise _unknown_key_error(key, "command line")
    values.update(overrides)
    return build_config(values, where)
