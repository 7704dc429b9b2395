#!/bin/bash
# A tiny PRM on CPU with two processes (tensor parallel 2, gloo): synthetic data, train, score, evaluate.
#   bash examples/train_cpu.sh        (from the repository root, after `make venv`)
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
OUT=runs/cpu-example
"$PYTHON" -c "from megatron_prm.data.synthetic import write_dataset as w; w('$OUT/data/train.jsonl', 4000, seed=1); w('$OUT/data/dev.jsonl', 200, seed=2)"
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_prm train \
  examples/configs/cpu_tiny_prm.yaml --tensor_parallel_degree 2
"$PYTHON" -m megatron_prm score --checkpoint "$OUT/run" --data "$OUT/data/dev.jsonl" --output "$OUT/dev_scores.jsonl"
"$PYTHON" -m megatron_prm evaluate --scores "$OUT/dev_scores.jsonl" --benchmark processbench
