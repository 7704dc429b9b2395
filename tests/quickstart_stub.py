"""Offline stand-ins for the network commands of the README quick start (``hf``, ``curl``, ``sbatch``).

``tests/test_quickstart.py`` puts wrappers named after them first on PATH: ``hf download`` writes a tiny
Llama model (Mistral-7B v0.1 vocabulary as an HF tokenizer) or Math-Shepherd-format records, ``curl``
writes ProcessBench-format records, ``sbatch`` checks the script and records the submission. The files
have the layout of the real downloads, so every other command of the quick start runs unchanged.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_prm.data.synthetic import make_record

# Enough for one global batch of the Llama-3-8B recipe: 8 packed rows of 4096 tokens (about 85 tokens a record).
MATH_SHEPHERD_RECORDS = 440
PROCESSBENCH_URL = "https://github.com/QwenLM/ProcessBench/raw/main/dataset/gsm8k.json"


def records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_record(rng) for _ in range(count)]


def write_tiny_llama(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    with tempfile.TemporaryDirectory() as spm:
        shutil.copy(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1",
                    Path(spm) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(spm)
    torch.manual_seed(0)
    # 8 query and 8 key/value heads: the SLURM script's default TP8 plan divides them, as Llama-3-8B's.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                         rope_theta=500000.0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_math_shepherd(path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records(MATH_SHEPHERD_RECORDS, seed=1):
            steps = "".join(f"Step {i + 1}: {step} ки\n" for i, step in enumerate(record["responses"]))
            label = steps
            for tag in record["labels"]:
                label = label.replace("ки", tag, 1)
            handle.write(json.dumps({"input": f"{record['src']} {steps}", "label": f"{record['src']} {label}",
                                     "task": "synthetic"}, ensure_ascii=False) + "\n")


def write_processbench(path: Path) -> None:
    items = [{"id": f"gsm8k-{i}", "generator": "synthetic", "problem": r["src"], "steps": r["responses"],
              "final_answer_correct": r["first_error"] == -1, "label": r["first_error"]}
             for i, r in enumerate(records(40, seed=2))]
    path.write_text(json.dumps(items, ensure_ascii=False, indent=1))


def hf(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="hf")
    parser.add_argument("command", choices=["download"])
    parser.add_argument("repo_id")
    parser.add_argument("filenames", nargs="*")
    parser.add_argument("--local-dir", type=Path, required=True)
    parser.add_argument("--repo-type", default="model")
    parser.add_argument("--exclude", action="append")
    args = parser.parse_args(argv)
    args.local_dir.mkdir(parents=True, exist_ok=True)
    if args.repo_type == "dataset":
        assert args.repo_id == "peiyi9979/Math-Shepherd" and args.filenames == ["math-shepherd.jsonl"], argv
        write_math_shepherd(args.local_dir / "math-shepherd.jsonl")
    else:
        write_tiny_llama(args.local_dir)


def curl(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="curl")
    parser.add_argument("-L", action="store_true")
    parser.add_argument("-o", type=Path, required=True)
    parser.add_argument("url")
    args = parser.parse_args(argv)
    assert args.url == PROCESSBENCH_URL, args.url
    write_processbench(args.o)


def sbatch(argv: list[str]) -> None:
    script = Path(argv[-1])
    subprocess.run(["bash", "-n", str(script)], check=True)  # a script that does not parse is refused
    with open(os.environ["QUICKSTART_SBATCH_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps(argv) + "\n")
    print("Submitted batch job 1")


if __name__ == "__main__":
    {"hf": hf, "curl": curl, "sbatch": sbatch}[sys.argv[1]](sys.argv[2:])
