#!/usr/bin/env python
"""Convert Hugging Face Llama / Mistral / Qwen2 / Qwen2.5 / Qwen3 checkpoints to Megatron-Core checkpoints
and back, from a checkout: the installed ``megatron-prm convert-hf`` command
(megatron_prm/conversion/command.py), with the same options.

  python tools/convert_hf.py import --hf DIR --out DIR [--tp N --pp M --dtype bf16]
  python tools/convert_hf.py export --megatron DIR --out DIR [--dtype bf16 --max-shard-size 5GB]
                                    [--as causal-lm | token-classifier [--step-tag TAG --reward-tokens GOOD,BAD]]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, as the other tools

from megatron_prm import megatron_compat  # noqa: E402
from megatron_prm.cli import USER_ERRORS, ArgumentParser, add_debug_option  # noqa: E402
from megatron_prm.conversion.command import add_directions, convert_hf  # noqa: E402
from megatron_prm.error_boundary import run_guarded  # noqa: E402


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_option(parser, top_level=True)
    for sub in add_directions(parser):
        add_debug_option(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    megatron_compat.filter_unactionable_warnings()
    megatron_compat.import_megatron_core()
    args = build_parser().parse_args(argv)
    return run_guarded(f"convert_hf {args.direction}", lambda: convert_hf(args), own=USER_ERRORS, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
