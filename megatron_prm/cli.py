"""The ``megatron-prm`` command: ``train``, ``check-data`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from megatron_prm.config import ConfigError, load_config
from megatron_prm.data.records import RecordError
from megatron_prm.tokenizer import TokenizerError

USER_ERRORS = (ConfigError, RecordError, TokenizerError, FileNotFoundError)


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


def _check_data(args: argparse.Namespace) -> None:
    from megatron_prm.data.samples import SampleOptions, load_samples
    from megatron_prm.tokenizer import load_tokenizer, special_token_ids

    # Validate the options with the same dataclasses (and messages) as a training run.
    config = load_config(None, [
        "--max_seq_len", str(args.max_seq_len), "--max_prompt_len", str(args.max_prompt_len),
        "--placeholder_token", args.placeholder_token, "--reward_tokens", args.reward_tokens,
        "--process_reward", str(args.process_reward),
    ])
    tokenizer = load_tokenizer(args.tokenizer)
    special = special_token_ids(tokenizer, config.prm.placeholder_token, config.prm.reward_token_list)
    options = SampleOptions(config.data.max_seq_len, config.data.max_prompt_len, config.prm.process_reward)
    _, report = load_samples(args.data, tokenizer, special, options, tuple(config.prm.reward_token_list),
                             skip_invalid=args.skip_invalid)
    print(json.dumps({"file": args.data, **report.as_dict()}))


def _demo(args: argparse.Namespace) -> None:
    from megatron_prm.demo import run_demo

    run_demo(args.output_dir, quick=args.quick)


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
    check.add_argument("--data", required=True, help="JSON or JSONL records")
    check.add_argument("--tokenizer", required=True, help="tokenizer directory, .model file or mistral-common:NAME")
    check.add_argument("--max-seq-len", type=int, default=4096)
    check.add_argument("--max-prompt-len", type=int, default=2048)
    check.add_argument("--placeholder-token", default="ки")
    check.add_argument("--reward-tokens", default="+,-")
    check.add_argument("--process-reward", default="true", help="false: ORM mode, only the last step")
    check.add_argument("--skip-invalid", action="store_true", help="count malformed records instead of stopping")

    demo = commands.add_parser("demo", help="generate synthetic data, train a tiny PRM on CPU, print metrics")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (smoke test), not for the figures")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "train":
            _train(args, rest)
        elif args.command == "check-data":
            _check_data(args)
        elif args.command == "demo":
            _demo(args)
    except USER_ERRORS as err:
        print(f"megatron-prm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
