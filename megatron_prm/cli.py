"""The ``megatron-prm`` command: ``train``, ``check-data``, ``convert-data``, ``preprocess`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Optional

from megatron_prm.config import ConfigError, load_config
from megatron_prm.data.convert import FORMATS, NEUTRAL_CHOICES, FormatError
from megatron_prm.data.records import RecordError
from megatron_prm.data.store import StoreError
from megatron_prm.tokenizer import TokenizerError

USER_ERRORS = (ConfigError, RecordError, TokenizerError, FileNotFoundError, FormatError, StoreError)


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
    from megatron_prm.runtime import shutdown
    from megatron_prm.train import run_training

    config = load_config(args.config, overrides)
    try:
        metrics = run_training(config)
    finally:
        shutdown()
    if metrics is not None:
        print(json.dumps(metrics))


def _tokenize_job(args: argparse.Namespace):
    """The tokenization options of check-data / preprocess, validated like a training run's."""
    from megatron_prm.data.pipeline import tokenize_job

    config = load_config(None, [
        "--tokenizer_name_or_path", args.tokenizer, "--max_seq_len", str(args.max_seq_len),
        "--max_prompt_len", str(args.max_prompt_len), "--placeholder_token", args.placeholder_token,
        "--reward_tokens", args.reward_tokens, "--process_reward", str(args.process_reward),
        "--skip_invalid", str(args.skip_invalid),
    ])
    return tokenize_job(config, args.data)


def _check_data(args: argparse.Namespace) -> None:
    from megatron_prm.data.preprocess import RecordTokenizer
    from megatron_prm.data.samples import load_samples

    job = _tokenize_job(args)
    tokenizer = RecordTokenizer(job)
    _, report = load_samples(args.data, tokenizer.tokenizer, tokenizer.special, job.options, job.reward_tokens,
                             skip_invalid=job.skip_invalid)
    print(json.dumps({"file": args.data, **report.as_dict()}))


def _preprocess(args: argparse.Namespace) -> None:
    from megatron_prm.data.preprocess import preprocess

    meta = preprocess(_tokenize_job(args), args.output_prefix, workers=args.workers)
    print(json.dumps({"output_prefix": args.output_prefix, "samples": meta["samples"], "tokens": meta["tokens"],
                      "records_per_second": meta["records_per_second"], **meta["report"]}))


def _convert_data(args: argparse.Namespace) -> None:
    from megatron_prm.data.convert import convert_file

    report = convert_file(args.source_format, args.input, args.output, neutral=args.neutral)
    summary = report.as_dict()
    print(f"converted {summary['converted']} of {summary['read']} records; skipped: "
          + (", ".join(f"{n} ({reason})" for reason, n in summary["skipped_by_reason"].items()) or "none"),
          file=sys.stderr)
    print(json.dumps({"output": args.output, **summary}))


def _demo(args: argparse.Namespace) -> None:
    from megatron_prm.demo import run_demo

    run_demo(args.output_dir, quick=args.quick)


def _add_tokenize_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="JSON or JSONL records")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory, .model file or mistral-common:NAME")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--max-prompt-len", type=int, default=2048)
    parser.add_argument("--placeholder-token", default="ки")
    parser.add_argument("--reward-tokens", default="+,-")
    parser.add_argument("--process-reward", default="true", help="false: ORM mode, only the last step")
    parser.add_argument("--skip-invalid", action="store_true", help="count malformed records instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-prm", description="Process reward model training on Megatron-Core.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a PRM",
        description="Train a PRM. Arguments come from CONFIG (JSON or YAML), then from --name value "
        "overrides; see the argument table in README.md.",
    )
    train.add_argument("config", nargs="?", help="JSON or YAML file of arguments")

    check = commands.add_parser("check-data", help="validate and tokenize a data file; print a JSON summary")
    _add_tokenize_options(check)

    pre = commands.add_parser("preprocess", help="tokenize a data file once into a memory-mapped store")
    _add_tokenize_options(pre)
    pre.add_argument("--output-prefix", required=True, help="the store's files are PREFIX.tokens.bin, ...")
    pre.add_argument("--workers", type=int, default=1, help="tokenizing processes")

    convert = commands.add_parser("convert-data", help="convert public PRM data to this project's format")
    convert.add_argument("--from", dest="source_format", required=True, choices=FORMATS)
    convert.add_argument("--input", required=True)
    convert.add_argument("--output", required=True, help="JSONL to write")
    convert.add_argument("--neutral", default="positive", choices=NEUTRAL_CHOICES,
                         help="PRM800K rating 0: a good step, a bad step, or end the solution before it")

    demo = commands.add_parser("demo", help="generate synthetic data, train a tiny PRM on CPU, print metrics")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (smoke test), not for the figures")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    # Megatron-Core warns on import wherever Apex / Transformer Engine are absent (always, on CPU).
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "train":
            _train(args, rest)
        elif args.command == "check-data":
            _check_data(args)
        elif args.command == "preprocess":
            _preprocess(args)
        elif args.command == "convert-data":
            _convert_data(args)
        elif args.command == "demo":
            _demo(args)
    except USER_ERRORS as err:
        print(f"megatron-prm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
