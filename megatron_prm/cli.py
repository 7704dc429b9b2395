"""The ``megatron-prm`` command: ``train``, ``check-data``, ``convert-data``, ``preprocess``, ``score``, ``evaluate``,
``plan``, ``check-checkpoint`` and ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Optional, Sequence

from megatron_prm import megatron_compat, strict_json
from megatron_prm.conversion import command as convert_hf_command
from megatron_prm.config import (DEFAULT_TOKENIZATION, SECTIONS, TOKENIZATIONS, ConfigError, argument_type_name,
                                 load_config)
from megatron_prm.data.convert import FORMATS, NEUTRAL_CHOICES, FormatError
from megatron_prm.data.records import RecordError
from megatron_prm.data.store import STORE_FILES, StoreError
from megatron_prm.error_boundary import INTERRUPTED_STATUS, run_guarded
from megatron_prm.metrics import PRMBENCH_RULES, TIE_BREAKS, ScoresError
from megatron_prm.nonfinite import NonFiniteError
from megatron_prm.option_ranges import range_checked
from megatron_prm.output_paths import check_output_dir, check_output_file, check_output_prefix
from megatron_prm.tokenizer import TokenizerError

USER_ERRORS = (ConfigError, RecordError, TokenizerError, FileNotFoundError, FormatError, StoreError, ScoresError,
               NonFiniteError)


def normalize_option_spelling(argv: Sequence[str]) -> list[str]:
    """``--max_seq_len`` -> ``--max-seq-len``: every long option in either spelling, as torchrun accepts
    them. Values, and everything after a bare ``--``, are left alone."""
    normalized: list[str] = []
    for index, token in enumerate(argv):
        if token == "--":
            return normalized + list(argv[index:])
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            token = "--" + name.replace("_", "-") + eq + value
        normalized.append(token)
    return normalized


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose long options also accept underscores for hyphens (``--batch_size``) and
    whose numeric options are range-checked from one table (:mod:`megatron_prm.option_ranges`)."""

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        return range_checked(super().add_argument(*args, **kwargs))

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(normalize_option_spelling(list(args)), namespace)


def add_command(commands: Any, name: str, summary: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand of ``commands`` (what ``add_subparsers`` returned) whose ``--help`` opens with the summary
    the command list shows, unless it has a description of its own."""
    kwargs.setdefault("description", summary[0].upper() + summary[1:] + ".")
    return commands.add_parser(name, help=summary, **kwargs)


def add_debug_option(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """``--debug``: a traceback instead of the one-line error (as MEGATRON_PRM_DEBUG=1 does)."""
    parser.add_argument("--debug", action="store_true", default=False if top_level else argparse.SUPPRESS,
                        help="show the traceback of an error (also: MEGATRON_PRM_DEBUG=1)")


def config_keys_help() -> str:
    """Every run config key with its type, default and meaning, grouped by section (``train --help``)."""
    lines = ["config keys (in CONFIG, or on the command line as --key value; hyphens or underscores):"]
    for section, cls in SECTIONS.items():
        lines.append(f"  [{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{f.name} ({argument_type_name(f.name)}, default {default!r})")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def config_and_overrides(tokens: list[str], config: Optional[str] = None) -> tuple[Optional[str], list[str]]:
    """The run config file, given as the first positional argument or as ``--config FILE`` (the TRL / HF
    habit; ``--config=FILE`` too), and the ``--key value`` overrides that follow. ``config``: one that
    argparse already took."""
    if tokens and not tokens[0].startswith("-"):
        config, tokens = _one_config(config, tokens[0]), tokens[1:]
    overrides: list[str] = []
    position = 0
    while position < len(tokens):
        token = tokens[position]
        if token == "--config" or token.startswith("--config="):
            if "=" in token:
                value, position = token.split("=", 1)[1], position + 1
            elif position + 1 < len(tokens) and not tokens[position + 1].startswith("-"):
                value, position = tokens[position + 1], position + 2
            else:
                raise ConfigError("--config needs a JSON or YAML file")
            config = _one_config(config, value)
            continue
        overrides.append(token)
        position += 1
    return config, overrides


def _one_config(current: Optional[str], new: str) -> str:
    if current is not None and current != new:
        raise ConfigError(f"two configs given ({current} and {new}): give one, as CONFIG or --config CONFIG")
    return new


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from megatron_prm.runtime import shutdown
    from megatron_prm.train import TrainingInterrupted, run_training

    config = load_config(*config_and_overrides(overrides))
    try:
        metrics = run_training(config)
    except TrainingInterrupted as stop:
        # Saved at a step boundary: after SIGTERM / SIGUSR1 exit 0 (the job resumes with `auto`), after
        # Ctrl-C 130, as an interrupted command does.
        return INTERRUPTED_STATUS if stop.interrupted else 0
    finally:
        shutdown()
    if metrics is not None:
        print(strict_json.dumps(metrics))
    return 0


def _tokenize_job(args: argparse.Namespace):
    """The tokenization options of check-data / preprocess, validated like a training run's."""
    from megatron_prm.data.pipeline import tokenize_job

    config = load_config(None, [
        "--tokenizer_name_or_path", args.tokenizer, "--max_seq_len", str(args.max_seq_len),
        "--max_prompt_len", str(args.max_prompt_len), "--placeholder_token", args.placeholder_token,
        "--reward_tokens", args.reward_tokens, "--process_reward", str(args.process_reward),
        "--skip_invalid", str(args.skip_invalid), "--apply_chat_template", str(args.apply_chat_template),
        "--tokenization", args.tokenization,
        *([f"--system_prompt={args.system_prompt}"] if args.system_prompt is not None else []),
    ])
    return tokenize_job(config, args.data)


def _check_data(args: argparse.Namespace) -> None:
    from megatron_prm.data.preprocess import RecordTokenizer
    from megatron_prm.data.samples import load_samples

    job = _tokenize_job(args)
    tokenizer = RecordTokenizer(job)
    _, report = load_samples(args.data, tokenizer.tokenizer, tokenizer.special, job.options, job.reward_tokens,
                             skip_invalid=job.skip_invalid)
    summary = report.as_dict()
    labels = summary["label_counts"]
    print(f"{summary['kept']} of {summary['records']} records kept, {summary['labelled_positions']} labelled steps: "
          f"{labels['good']} good, {labels['bad']} bad, {labels['soft']} soft", file=sys.stderr)
    print(strict_json.dumps({"file": args.data, **summary}))


def _preprocess(args: argparse.Namespace) -> None:
    from megatron_prm.data.preprocess import preprocess

    check_output_prefix(args.output_prefix, STORE_FILES, [args.data, args.tokenizer], overwrite=args.overwrite)
    meta = preprocess(_tokenize_job(args), args.output_prefix, workers=args.workers)
    print(strict_json.dumps({"output_prefix": args.output_prefix, "samples": meta["samples"], "tokens": meta["tokens"],
                      "records_per_second": meta["records_per_second"], **meta["report"]}))


def _convert_data(args: argparse.Namespace) -> None:
    from megatron_prm.data.convert import convert_file

    check_output_file(args.output, [args.input])
    report = convert_file(args.source_format, args.input, args.output, neutral=args.neutral)
    summary = report.as_dict()
    labels = summary["label_counts"]
    print(f"read {summary['read']} records, wrote {summary['converted']} ({summary['steps']} steps: {labels['good']} "
          f"'+', {labels['bad']} '-'); skipped: "
          + (", ".join(f"{n} ({reason})" for reason, n in summary["skipped_by_reason"].items()) or "none"),
          file=sys.stderr)
    for first in summary["first_skipped_by_reason"].values():
        print(f"  skipped, for example: {first}", file=sys.stderr)
    print(strict_json.dumps({"output": args.output, **summary}))


def _score(args: argparse.Namespace, overrides: list[str]) -> None:
    import os
    import tempfile
    from pathlib import Path

    from megatron_prm.runtime import shutdown
    from megatron_prm.scoring import refuse_context_parallelism, score_file, scoring_config

    from megatron_prm.run_directory import is_megatron_run_or_checkpoint
    from megatron_prm.runtime import resolve_device

    check_output_file(args.output, [args.data, args.checkpoint, args.hf])
    if args.hf:
        from megatron_prm.conversion.serving import export_scoring_settings
        from megatron_prm.model.architecture import read_hf_config

        if is_megatron_run_or_checkpoint(Path(args.hf)):
            raise ConfigError(f"{args.hf} is a megatron-prm run or checkpoint, not a Hugging Face model: score "
                              f"it with --checkpoint {args.hf}")
        # An export of this project scores with its run's step tag and reward tokens unless told otherwise.
        overrides = [*export_scoring_settings(Path(args.hf), read_hf_config(args.hf)), *overrides]
    settings = load_config(None, ["--bf16", "false", *overrides])  # the overrides alone, checked early
    run_settings = settings.training
    resolve_device(run_settings.device)
    refuse_context_parallelism(settings.parallel)
    aggregates = tuple(a.strip() for a in args.aggregate.split(",") if a.strip())
    with tempfile.TemporaryDirectory(prefix="megatron-prm-score-") as scratch:
        checkpoint = args.checkpoint
        if args.hf:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError("--hf converts the model in this process; with several processes convert it once "
                                  "(megatron-prm convert-hf import) and pass --checkpoint")
            from megatron_prm.conversion.importer import hf_model_directory, import_hf
            from megatron_prm.conversion.token_classifier import scorer_reward_ids

            # Convert to the precision the scoring runs in (fp32 unless --bf16/--fp16 true), not the file's.
            dtype = "bf16" if run_settings.bf16 else "fp16" if run_settings.fp16 else "fp32"
            checkpoint = str(Path(scratch) / "checkpoint")
            hf_dir = hf_model_directory(args.hf, "--hf")
            import_hf(hf_dir, Path(checkpoint), dtype=dtype, progress=False,
                      reward_ids=scorer_reward_ids(hf_dir, settings.prm))
        config = scoring_config(checkpoint, args.data, overrides)
        try:
            summary = score_file(config, Path(args.output), aggregates, args.batch_size, packed=not args.no_packing)
        finally:
            shutdown()
    if summary is not None:
        print(strict_json.dumps(summary))


def _evaluate(args: argparse.Namespace) -> None:
    from megatron_prm import benchmarks
    from megatron_prm.progress import for_people, plural

    scored = benchmarks.ScoredRecords.read(args.scores)
    if args.tune_on and args.benchmark != "processbench":
        raise ConfigError("--tune-on applies to --benchmark processbench only")
    if args.benchmark == "processbench":
        result = benchmarks.processbench(scored, args.threshold, args.tune_on)
        for name, subset in result["subsets"].items():
            print(f"{name}: acc_erroneous {for_people(subset['acc_erroneous'])} acc_correct "
                  f"{for_people(subset['acc_correct'])} f1 {for_people(subset['f1'])} "
                  f"({plural(subset['items'], 'item')})", file=sys.stderr)
    elif args.benchmark == "prmbench":
        result = benchmarks.prmbench(scored, args.threshold, args.prmbench_rule)
        print(_prmbench_table(result), file=sys.stderr)
    elif args.benchmark == "steps":
        result = benchmarks.steps(scored, args.threshold)
    else:
        result = benchmarks.best_of_n(scored, args.tie_break)
        print(f"ties: {result['tie_break']}; majority vote {result['majority_vote_accuracy']:.4f}, pass@N "
              f"{result['pass_at_n']:.4f}; " + ", ".join(
                  f"{name}: PRM pick {result['prm_accuracy'][name]:.4f}, weighted vote "
                  f"{result['weighted_vote_accuracy'][name]:.4f}" for name in result["prm_accuracy"]),
              file=sys.stderr)
    headline = benchmarks.HEADLINE[args.benchmark]
    print(f"{args.benchmark}: {headline} = {for_people(result[headline])}", file=sys.stderr)
    print(strict_json.dumps({"benchmark": args.benchmark, "scores": args.scores, headline: result[headline],
                      **{k: v for k, v in result.items() if k != headline}}))


def _prmbench_table(result: dict) -> str:
    """PRMBench's per-class figures, as its report gives them: PRMScore, F1 of valid (+) and of invalid (-)
    steps, in percent; ``-`` for the -1 of an F1 its scorer could not compute."""
    def cell(value: float) -> str:
        return f"{100 * value + 0.0:9.1f}" if value >= 0 else f"{'-':>9}"  # + 0.0: -0.0 prints as 0.0

    lines = [f"{'class':24}{'PRMScore':>9}{'F1 +':>9}{'F1 -':>9}{'steps':>8}"]
    rows = [*result["classes"].items(), ("total", result)]
    for name, figures in rows:
        counts = figures["tp"] + figures["fp"] + figures["tn"] + figures["fn"]
        lines.append(f"{name:24}{cell(figures['prmbench_score'])}{cell(figures['f1_correct'])}{cell(figures['f1_erroneous'])}"
                     f"{counts:>8}")
    return "\n".join(lines)


def _plan(args: argparse.Namespace, overrides: list[str]) -> None:
    from megatron_prm.model.architecture import resolve_architecture
    from megatron_prm.plan import describe, plan

    path, overrides = config_and_overrides(overrides, args.config)
    if path is None:
        raise ConfigError("plan needs the run's config: megatron-prm plan CONFIG (or --config CONFIG)")
    config = load_config(path, overrides)
    arch = resolve_architecture(config.model, 1, config.data.max_seq_len, config.prm.reward_head)
    if arch.vocab_size == 1:
        raise ConfigError("plan reads the vocabulary size from the model config (model_config or vocab_size)")
    result = plan(config, arch, args.nodes, args.gpus_per_node, args.gpu_memory_gib)
    print(describe(result), file=sys.stderr)
    print(strict_json.dumps(result))


def _check_checkpoint(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_prm.checkpoint_manifest import checkpoint_verdict
    from megatron_prm.run_directory import DCP_METADATA_NAME, checkpoints, read_latest

    directory = Path(args.directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory")
    if (directory / DCP_METADATA_NAME).is_file():
        targets = [directory]
    else:
        latest = read_latest(directory)
        targets = list(checkpoints(directory).values())
        if latest is not None and latest not in targets:
            targets.append(latest)
        if not targets:
            raise ConfigError(f"{directory} holds no checkpoint (neither a checkpoint nor a run directory)")
    verdicts = [checkpoint_verdict(path, checksums=not args.no_checksums) for path in targets]
    for _, line in verdicts:
        print(line)
    return 0 if all(ok for ok, _ in verdicts) else 1


def _reshard(args: argparse.Namespace) -> None:
    import os

    from megatron_prm.reshard import reshard

    path = reshard(args.checkpoint, args.output_dir, args.device, int(os.environ.get("WORLD_SIZE", "1")))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path} (fully reshardable): resume from it under any tensor/pipeline layout, e.g. "
              f"`train CONFIG --output_dir {args.output_dir} --resume_from_checkpoint auto "
              "--tensor_parallel_degree N`", file=sys.stderr)
        print(strict_json.dumps({"checkpoint": str(path)}))


def _demo(args: argparse.Namespace) -> None:
    from megatron_prm.demo import run_demo

    check_output_dir(args.output_dir)
    run_demo(args.output_dir, quick=args.quick, tokenization=args.tokenization)


def _add_tokenize_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="JSON or JSONL records")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory, .model file or mistral-common:NAME")
    parser.add_argument("--max-seq-len", type=int, default=4096,
                        help="tokens per sample (the run's max_seq_len); longer records are truncated or dropped")
    parser.add_argument("--max-prompt-len", type=int, default=None, help="default: max-seq-len // 2")
    parser.add_argument("--placeholder-token", default="ки", help="the token that ends each step (default ки)")
    parser.add_argument("--reward-tokens", default="+,-", help="GOOD,BAD: the labels' tokens (default +,-)")
    parser.add_argument("--process-reward", default="true", help="false: ORM mode, only the last step")
    parser.add_argument("--skip-invalid", action="store_true", help="count malformed records instead of stopping")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="build prompts with the tokenizer's chat template (as the run will)")
    parser.add_argument("--system-prompt", default=None, help="with --apply-chat-template: the system message")
    parser.add_argument("--tokenization", choices=TOKENIZATIONS, default=DEFAULT_TOKENIZATION,
                        help="as the run will tokenize: whole_text, each record rendered as text and tokenized whole "
                        "(as a serving engine does); per_step, each step apart (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="megatron-prm", description="Process reward model training on Megatron-Core. "
                            "Options may be spelled with hyphens or underscores (--max-seq-len, --max_seq_len).")
    commands = parser.add_subparsers(dest="command", required=True)

    train = add_command(commands, "train", "train a PRM",
        description="Train a PRM. Arguments come from CONFIG (JSON or YAML; also --config CONFIG), then from "
        "--key value overrides.",
        epilog=config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", nargs="?", help="JSON or YAML file of arguments (or --config CONFIG)")

    check = add_command(commands, "check-data", "validate and tokenize a data file; print a JSON summary")
    _add_tokenize_options(check)

    pre = add_command(commands, "preprocess", "tokenize a data file once into a memory-mapped store")
    _add_tokenize_options(pre)
    pre.add_argument("--output-prefix", required=True, help="the store's files are PREFIX.tokens.bin, ...")
    pre.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    pre.add_argument("--overwrite", action="store_true", help="replace an existing store at the prefix")

    convert = add_command(commands, "convert-data", "convert public PRM data to this project's format")
    convert.add_argument("--from", dest="source_format", required=True, choices=FORMATS,
                         help="the public data set's format")
    convert.add_argument("--input", required=True, help="the downloaded file (JSON or JSONL)")
    convert.add_argument("--output", required=True, help="JSONL to write")
    convert.add_argument("--neutral", default="positive", choices=NEUTRAL_CHOICES,
                         help="PRM800K rating 0: a good step, a bad step, or end the solution before it")

    score = add_command(commands, "score", "P(good) of every step of every record, and aggregates per record",
        description="Score records with a trained PRM, in fp32 unless told (--bf16 true / --fp16 true); the "
        "precision used is printed. Extra --name value arguments override the run settings "
        "(e.g. --tensor_parallel_degree 2 --device cuda).")
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a megatron-prm checkpoint or run directory (its latest)")
    source.add_argument("--hf", help="an HF Llama / Mistral / Qwen2 / Qwen3 PRM directory (converted in memory-light "
                        "streaming first)")
    score.add_argument("--data", required=True, help="JSON or JSONL records; labels optional")
    score.add_argument("--output", required=True, help="JSONL of scores to write")
    score.add_argument("--aggregate", default="min,last,prod,mean", help="comma-separated: min,last,prod,mean,max")
    score.add_argument("--batch-size", type=int, default=8, help="records per micro batch without packing")
    score.add_argument("--no-packing", action="store_true", help="pad records instead of packing them into rows")

    evaluate = add_command(commands, "evaluate", "benchmark figures from a score output file; last line JSON")
    evaluate.add_argument("--scores", required=True, help="JSONL written by megatron-prm score")
    evaluate.add_argument("--benchmark", required=True, choices=("processbench", "prmbench", "steps", "best-of-n"),
                          help="processbench / prmbench: the official scorers' figures; steps: step accuracy, F1, "
                          "AUROC; best-of-n: accuracy of the top-scored candidate per problem")
    evaluate.add_argument("--threshold", type=float, default=0.5,
                          help="P(+) below it marks a step wrong (prmbench: see --prmbench-rule)")
    evaluate.add_argument("--tune-on", help="processbench: tune the threshold on this subset, apply it to all")
    evaluate.add_argument("--prmbench-rule", choices=PRMBENCH_RULES, default="gt",
                          help="prmbench: a step is valid when P(+) > threshold (gt, the official scorer) or >= (ge)")
    evaluate.add_argument("--tie-break", choices=TIE_BREAKS, default="expected",
                          help="best-of-n: expected accuracy under uniform random tie-breaking, or the first-seen "
                          "candidate / answer")

    plan = add_command(
        commands, "plan", "layout, parameters and memory per GPU of a run config; refuses what cannot divide or fit",
        description="Plan a run without a GPU. Extra --name value arguments override the config.")
    plan.add_argument("--config", help="the run's JSON or YAML config (or as the first argument: plan CONFIG)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes of the run (default 1)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs of each node (default 8)")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (H100: 80)")

    check_ckpt = add_command(
        commands, "check-checkpoint", "verify checkpoints against their manifests; one verdict line per checkpoint")
    check_ckpt.add_argument("directory", help="a checkpoint (iter_NNNNNNN) or a run directory (all its checkpoints)")
    check_ckpt.add_argument("--no-checksums", action="store_true", help="check sizes only, not CRC-32")

    reshard = add_command(
        commands, "reshard", "rewrite a training checkpoint so that a resume may change tensor/pipeline layout",
        description="Load a checkpoint whose distributed-optimizer state is dp_reshardable (the default of "
        "regular saves) under its own tensor x pipeline layout and write it fully reshardable as the first "
        "checkpoint of a new run directory. Run it with torchrun on a multiple of the saved tensor x pipeline "
        "size (any data-parallel size).")
    reshard.add_argument("checkpoint", help="a checkpoint (iter_NNNNNNN) or a run directory (its latest)")
    reshard.add_argument("--output-dir", required=True, help="the new run directory (must be empty or absent)")
    reshard.add_argument("--device", default="cuda", help="cuda (default) or cpu")

    convert_hf = add_command(
        commands, "convert-hf", "Hugging Face checkpoints -> Megatron-Core checkpoints (import) and back (export)",
        description=convert_hf_command.__doc__.split("\n\n")[0] + "\n\n" + convert_hf_command.USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    directions = convert_hf_command.add_directions(convert_hf)

    demo = add_command(commands, "demo", "generate synthetic data, train a tiny PRM on CPU, print metrics")
    demo.add_argument("--output-dir", default="runs/demo", help="where the data, the run and summary.json go")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (smoke test), not for the figures")
    demo.add_argument("--tokenization", choices=TOKENIZATIONS, default=None,
                      help="how records become ids (the run's tokenization key; default %s)" % DEFAULT_TOKENIZATION)
    add_debug_option(parser, top_level=True)
    for sub in (train, check, pre, convert, score, evaluate, plan, check_ckpt, demo, convert_hf, *directions):
        add_debug_option(sub)
    return parser


# The commands that build or load a Megatron model; the others start without importing Megatron-Core.
MEGATRON_COMMANDS = frozenset({"train", "score", "plan", "reshard", "demo", "convert-hf"})


def main(argv: Optional[list[str]] = None) -> int:
    megatron_compat.filter_unactionable_warnings()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if args.command in MEGATRON_COMMANDS:
        megatron_compat.import_megatron_core()
    if args.command == "train":
        # argparse would take the value of a leading --name value override for the optional CONFIG.
        rest = [t for t in argv[argv.index("train") + 1:] if t != "--debug"]
    if rest and args.command not in ("train", "score", "plan"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    commands = {"train": lambda: _train(args, rest), "check-data": lambda: _check_data(args),
                "preprocess": lambda: _preprocess(args), "convert-data": lambda: _convert_data(args),
                "score": lambda: _score(args, rest), "evaluate": lambda: _evaluate(args),
                "plan": lambda: _plan(args, rest), "demo": lambda: _demo(args), "reshard": lambda: _reshard(args),
                "check-checkpoint": lambda: _check_checkpoint(args),
                "convert-hf": lambda: convert_hf_command.convert_hf(args)}
    return run_guarded(f"megatron-prm {args.command}", commands[args.command], own=USER_ERRORS, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
