"""``make demo``: synthetic arithmetic data -> a tiny Mistral-architecture PRM trained on CPU -> held-out metrics.

The model uses the real Mistral-7B v0.1 tokenizer shipped by ``mistral-common`` (``ки`` = 12902,
``+`` = 648, ``-`` = 387, the Math-Shepherd ids) and a 3-layer, 64-wide Mistral-shaped network (GQA,
RMSNorm, SwiGLU, RoPE, untied embeddings). It ends with the held-out figures beside the majority-class
baseline; all of them are also written to ``OUTPUT_DIR/summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from megatron_prm import strict_json
from megatron_prm.config import build_config
from megatron_prm.data.synthetic import write_dataset

TRAIN_RECORDS = 40000
DEV_RECORDS = 1000

DEMO_ARGUMENTS = {
    "tokenizer_name_or_path": "mistral-common:tokenizer.model.v1",
    "num_hidden_layers": 3,
    "hidden_size": 64,
    "intermediate_size": 224,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "max_seq_len": 256,
    "max_prompt_len": 128,
    "device": "cpu",
    "bf16": False,
    "learning_rate": 3e-3,
    "min_learning_rate": 1e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 50,
    "weight_decay": 0.01,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 100,
    "gradient_accumulation_steps": 1,
    "max_steps": 2000,
    "eval_steps": 500,
    "save_steps": 100000,
    "logging_steps": 200,
    "seed": 1234,
}

QUICK_OVERRIDES = {"max_steps": 20, "warmup_steps": 5, "eval_steps": 10, "logging_steps": 5}


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def score_and_evaluate(checkpoint: Path, data: Path, scores: Path) -> dict:
    """What ``megatron-prm score`` and ``megatron-prm evaluate`` do, on the held-out set: the trained
    checkpoint scores every step, then ProcessBench's first-error F1 and the step figures are computed
    from the scores file alone."""
    from megatron_prm import benchmarks
    from megatron_prm.runtime import shutdown
    from megatron_prm.scoring import score_file, scoring_config

    config = scoring_config(str(checkpoint), str(data), [])
    try:
        score_file(config, scores, ("min", "last", "prod", "mean"), batch_size=100, packed=True)
    finally:
        shutdown()
    records = benchmarks.ScoredRecords.read(scores)
    return {"scored_step_accuracy": _rounded(benchmarks.steps(records)["accuracy"]),
            "scored_processbench_f1": _rounded(benchmarks.processbench(records)["average_f1"]),
            "scores_file": str(scores)}


def run_demo(output_dir: str | Path, quick: bool = False, tokenization: Optional[str] = None) -> dict:
    from megatron_prm.runtime import shutdown
    from megatron_prm.train import run_training

    started = time.perf_counter()
    output_dir = Path(output_dir)
    train_path = write_dataset(output_dir / "data" / "train.jsonl", TRAIN_RECORDS, seed=1)
    dev_path = write_dataset(output_dir / "data" / "dev.jsonl", DEV_RECORDS, seed=2)
    arguments = {
        **DEMO_ARGUMENTS,
        "train_dataset_path": str(train_path),
        "dev_dataset_path": str(dev_path),
        "output_dir": str(output_dir / "run"),
        "overwrite_output_dir": True,  # a repeated demo moves the earlier run aside (run/earlier_run_*)
        **(QUICK_OVERRIDES if quick else {}),
        **({"tokenization": tokenization} if tokenization else {}),
    }
    config = build_config(arguments, "demo")
    try:
        metrics = run_training(config)
    finally:
        shutdown()
    assert metrics is not None, "the demo runs as one process, which is the logging rank"
    scored = score_and_evaluate(output_dir / "run", dev_path, output_dir / "dev_scores.jsonl")
    baseline = metrics["majority_baseline"]
    summary = {
        "step_accuracy": _rounded(metrics["accuracy"]),
        "neg_f1": _rounded(metrics["neg_f1"]),
        "auroc": _rounded(metrics["auroc"]),
        "first_error_f1": _rounded(metrics["first_error_f1"]),
        "majority_step_accuracy": _rounded(baseline["accuracy"]),
        "majority_first_error_f1": _rounded(baseline["first_error_f1"]),
        "eval_steps": metrics["steps"],
        "eval_records": metrics["records_erroneous"] + metrics["records_correct"],
        "train_steps": config.training.max_steps,
        **scored,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    summary_path = output_dir / "summary.json"
    summary_path.write_text(strict_json.dumps(summary, indent=2) + "\n")
    print(f"scored again from the saved checkpoint: step accuracy {summary['scored_step_accuracy']:.4f}, "
          f"ProcessBench-style F1 {summary['scored_processbench_f1']:.4f} (scores: {summary['scores_file']}); "
          f"all figures in {summary_path}")
    print(f"held-out figures after {summary['train_steps']} steps ({summary['eval_records']} records, "
          f"{summary['eval_steps']} steps, planted errors):")
    print(f"  {'':24}{'PRM':>10}{'majority':>10}")
    for label, key, base_key in (
        ("step accuracy", "step_accuracy", "majority_step_accuracy"),
        ("first-error F1", "first_error_f1", "majority_first_error_f1"),
    ):
        print(f"  {label:24}{summary[key]:>10.4f}{summary[base_key]:>10.4f}")
    print(f"  {'negative-class F1':24}{summary['neg_f1']:>10.4f}")
    print(f"  {'AUROC':24}{summary['auroc'] if summary['auroc'] is not None else float('nan'):>10.4f}")
    return summary
