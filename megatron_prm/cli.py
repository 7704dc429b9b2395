"""The ``megatron-prm`` command: ``train``, ``check-data``, ``convert-data``, ``preprocess``, ``score``, ``evaluate``,
``plan`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from megatron_prm import megatron_compat
from megatron_prm.config import ConfigError, load_config
from megatron_prm.data.convert import FORMATS, NEUTRAL_CHOICES, FormatError
from megatron_prm.data.records import RecordError
from megatron_prm.data.store import StoreError
from megatron_prm.benchmarks import ScoresError
from megatron_prm.tokenizer import TokenizerError

USER_ERRORS = (ConfigError, RecordError, TokenizerError, FileNotFoundError, FormatError, StoreError, ScoresError)


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


def _score(args: argparse.Namespace, overrides: list[str]) -> None:
    import os
    import tempfile
    from pathlib import Path

    from megatron_prm.runtime import shutdown
    from megatron_prm.scoring import score_file, scoring_config

    aggregates = tuple(a.strip() for a in args.aggregate.split(",") if a.strip())
    with tempfile.TemporaryDirectory(prefix="megatron-prm-score-") as scratch:
        checkpoint = args.checkpoint
        if args.hf:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError("--hf converts the model in this process; with several processes convert it once "
                                  "(tools/convert_hf.py import) and pass --checkpoint")
            from megatron_prm.conversion.importer import import_hf

            checkpoint = str(Path(scratch) / "checkpoint")
            import_hf(Path(args.hf), Path(checkpoint), progress=False)
        config = scoring_config(checkpoint, args.data, overrides)
        try:
            summary = score_file(config, Path(args.output), aggregates, args.batch_size, packed=not args.no_packing)
        finally:
            shutdown()
    if summary is not None:
        print(json.dumps(summary))


def _evaluate(args: argparse.Namespace) -> None:
    from megatron_prm import benchmarks
    from megatron_prm.data.records import iter_raw_records

    records = [raw for _, _, raw in iter_raw_records(args.scores)]
    if args.benchmark == "processbench":
        result = benchmarks.processbench(records, args.threshold, args.tune_on)
        for name, subset in result["subsets"].items():
            print(f"{name}: acc_erroneous {subset['acc_erroneous']} acc_correct {subset['acc_correct']} "
                  f"f1 {subset['f1']} ({subset['items']} items)", file=sys.stderr)
    elif args.tune_on:
        raise ConfigError("--tune-on applies to --benchmark processbench only")
    elif args.benchmark == "prmbench":
        result = benchmarks.prmbench(records, args.threshold)
    elif args.benchmark == "steps":
        result = benchmarks.steps(records, args.threshold)
    else:
        result = benchmarks.best_of_n(records)
    headline = benchmarks.HEADLINE[args.benchmark]
    print(f"{args.benchmark}: {headline} = {result[headline]}", file=sys.stderr)
    print(json.dumps({"benchmark": args.benchmark, "scores": args.scores, headline: result[headline],
                      **{k: v for k, v in result.items() if k != headline}}))


def _plan(args: argparse.Namespace, overrides: list[str]) -> None:
    from megatron_prm.model.architecture import resolve_architecture
    from megatron_prm.plan import describe, plan

    config = load_config(args.config, overrides)
    arch = resolve_architecture(config.model, 1, config.data.max_seq_len)
    if arch.vocab_size == 1:
        raise ConfigError("plan reads the vocabulary size from the model config (model_config or vocab_size)")
    result = plan(config, arch, args.nodes, args.gpus_per_node, args.gpu_memory_gib)
    print(describe(result), file=sys.stderr)
    print(json.dumps(result))


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

    score = commands.add_parser(
        "score", help="P(good) of every step of every record, and aggregates per record",
        description="Score records with a trained PRM. Extra --name value arguments override the run settings "
        "(e.g. --tensor_parallel_degree 2 --device cuda --bf16 true).")
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a megatron-prm checkpoint or run directory (its latest)")
    source.add_argument("--hf", help="an HF Llama/Mistral PRM directory (converted in memory-light streaming first)")
    score.add_argument("--data", required=True, help="JSON or JSONL records; labels optional")
    score.add_argument("--output", required=True, help="JSONL of scores to write")
    score.add_argument("--aggregate", default="min,last,prod,mean", help="comma-separated: min,last,prod,mean,max")
    score.add_argument("--batch-size", type=int, default=8, help="records per micro batch without packing")
    score.add_argument("--no-packing", action="store_true", help="pad records instead of packing them into rows")

    evaluate = commands.add_parser("evaluate", help="benchmark figures from a score output file; last line JSON")
    evaluate.add_argument("--scores", required=True, help="JSONL written by megatron-prm score")
    evaluate.add_argument("--benchmark", required=True, choices=("processbench", "prmbench", "steps", "best-of-n"))
    evaluate.add_argument("--threshold", type=float, default=0.5, help="P(+) below it marks a step wrong")
    evaluate.add_argument("--tune-on", help="processbench: tune the threshold on this subset, apply it to all")

    plan = commands.add_parser(
        "plan", help="layout, parameters and memory per GPU of a run config; refuses what cannot divide or fit",
        description="Plan a run without a GPU. Extra --name value arguments override the config.")
    plan.add_argument("--config", required=True, help="the run's JSON or YAML config")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (H100: 80)")

    demo = commands.add_parser("demo", help="generate synthetic data, train a tiny PRM on CPU, print metrics")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (smoke test), not for the figures")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    megatron_compat.filter_unactionable_warnings()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        # argparse would take the value of a leading --name value override for the optional CONFIG.
        tokens = argv[argv.index("train") + 1:]
        args.config = tokens[0] if tokens and not tokens[0].startswith("-") else None
        rest = tokens[1:] if args.config else tokens
    if rest and args.command not in ("train", "score", "plan"):
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
        elif args.command == "score":
            _score(args, rest)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "plan":
            _plan(args, rest)
        elif args.command == "demo":
            _demo(args)
    except USER_ERRORS as err:
        print(f"megatron-prm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
