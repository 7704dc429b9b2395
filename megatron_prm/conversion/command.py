"""``megatron-prm convert-hf import|export``: Hugging Face Llama / Mistral / Qwen2 / Qwen2.5 / Qwen3
checkpoints to Megatron-Core checkpoints and back (``tools/convert_hf.py`` is the same command).

Tensors are read and written one at a time (peak memory near one layer), the output directory appears
only when complete, and nothing is unpickled: HF weights are read from safetensors only.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from megatron_prm.output_paths import check_output_dir

USAGE = """\
  convert-hf import --hf DIR --out DIR [--tp N --pp M --dtype bf16]
  convert-hf export --megatron DIR --out DIR [--dtype bf16 --max-shard-size 5GB]
                    [--as causal-lm | token-classifier] [--step-tag TAG --reward-tokens GOOD,BAD]"""

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG]?B)?$", re.IGNORECASE)
_UNITS = {None: 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = match.group(2).upper() if match.group(2) else None
    return int(float(match.group(1)) * _UNITS[unit])


def add_directions(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The ``import`` and ``export`` subcommands and their options, on ``parser``; returns the two."""
    directions = parser.add_subparsers(dest="direction", required=True,
                                       help="import: HF -> Megatron; export: Megatron -> HF")
    imp = directions.add_parser("import", help="HF -> Megatron",
                                description="Import an HF model directory as a Megatron-Core checkpoint (torch_dist) "
                                "with its tokenizer inside; any tensor/pipeline layout loads it.")
    imp.add_argument("--hf", required=True, type=Path, help="HF model directory (config.json, *.safetensors)")
    imp.add_argument("--out", required=True, type=Path, help="Megatron checkpoint directory to create")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check against and pad the vocabulary for")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check against")
    imp.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: the HF weights' dtype")
    exp = directions.add_parser("export", help="Megatron -> HF",
                                description="Export a megatron-prm checkpoint (or a run's latest) as an HF model "
                                "directory: safetensors, config.json and the tokenizer.")
    exp.add_argument("--megatron", required=True, type=Path, help="checkpoint directory, or a run directory (its latest)")
    exp.add_argument("--out", required=True, type=Path, help="HF model directory to create")
    exp.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: the checkpoint's dtype")
    exp.add_argument("--max-shard-size", type=parse_size, default="5GB", help="safetensors shard size (default 5GB)")
    exp.add_argument("--as", dest="target", choices=("causal-lm", "token-classifier"), default="causal-lm",
                     help="causal-lm (default): *ForCausalLM (an MLP-head PRM: its *ForProcessRewardModel layout); "
                     "token-classifier: *ForTokenClassification, 2 labels (good, bad) from the reward tokens' LM-head rows")
    exp.add_argument("--step-tag", help="the step tag in prm_serving.json (default: the run's placeholder_token)")
    exp.add_argument("--reward-tokens", help="GOOD,BAD: the token classifier's rows and prm_serving.json's reward "
                     "tokens (default: the run's reward_tokens)")
    # Before or after the direction (`--no-progress import ...` or `import ... --no-progress`).
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    for sub in (imp, exp):
        sub.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return [imp, exp]


def convert_hf(args: argparse.Namespace) -> None:
    """Run the conversion ``args`` describe; prints its JSON summary (an export also a line on stderr on how
    to serve it)."""
    if args.direction == "import":
        from megatron_prm.conversion.importer import hf_model_directory, import_hf

        check_output_dir(args.out, [args.hf], what="--out")
        summary = import_hf(hf_model_directory(str(args.hf), "--hf"), args.out, args.tp, args.pp, args.dtype,
                            progress=not args.no_progress)
    else:
        from megatron_prm.conversion.exporter import export_hf

        check_output_dir(args.out, [args.megatron], what="--out")
        summary = export_hf(args.megatron, args.out, args.dtype, args.max_shard_size, progress=not args.no_progress,
                            target=args.target, step_tag=args.step_tag, reward_tokens=args.reward_tokens)
    print(json.dumps(summary))
