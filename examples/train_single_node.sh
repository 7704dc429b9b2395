#!/bin/bash
# One node, torchrun directly (no SLURM): convert, preprocess, train, export.
#   HF_MODEL=/models/Meta-Llama-3-8B DATA=data/train.jsonl bash examples/train_single_node.sh
set -euo pipefail
HF_MODEL=${HF_MODEL:-/models/Meta-Llama-3-8B}
DATA=${DATA:-data/train.jsonl}
DEV_DATA=${DEV_DATA:-data/dev.jsonl}
WORK=${WORK:-work/single-node}
CONFIG=${CONFIG:-examples/configs/llama3_8b_prm.yaml}
GPUS=${GPUS:-8}
TP=${TP:-8}
PYTHON=${PYTHON:-python}
export CUDA_DEVICE_MAX_CONNECTIONS=1

"$PYTHON" -m megatron_prm plan --config "$CONFIG" --nodes 1 --gpus-per-node "$GPUS" \
  --tensor_parallel_degree "$TP" --model_name_or_path null --model_config "$HF_MODEL/config.json"
[[ -f "$WORK/checkpoint/model_config.json" ]] || "$PYTHON" -m megatron_prm convert-hf import --hf "$HF_MODEL" --out "$WORK/checkpoint" --tp "$TP"
[[ -f "$WORK/store/train.meta.json" ]] || "$PYTHON" -m megatron_prm preprocess --data "$DATA" \
  --tokenizer "$WORK/checkpoint/tokenizer" --output-prefix "$WORK/store/train" --workers 16
torchrun --standalone --nproc-per-node "$GPUS" -m megatron_prm train "$CONFIG" \
  --model_name_or_path "$WORK/checkpoint" --train_dataset_path "$WORK/store/train" --dev_dataset_path "$DEV_DATA" \
  --output_dir "$WORK/run" --tensor_parallel_degree "$TP"
"$PYTHON" -m megatron_prm convert-hf export --megatron "$WORK/run" --out "$WORK/hf"
