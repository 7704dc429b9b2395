#!/bin/bash
#SBATCH --job-name=prm-llama3-8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#
# Train a Llama-3-8B process reward model on N nodes x 8 GPUs with SLURM:
#
#   sbatch --nodes 4 examples/train_llama3_8b_prm.sh          (inside an NVIDIA PyTorch container
#   DRY_RUN=1 bash examples/train_llama3_8b_prm.sh             with `pip install -e .` done)
#
# The flow, each step skipped when its output already exists:
#   0. plan       megatron-prm plan: layout, parameters and memory per GPU; a layout that cannot divide
#                 or fit stops the job here, in seconds (DRY_RUN=1 stops after printing the commands)
#   1. convert    megatron-prm convert-hf import: HF Llama-3 -> Megatron checkpoint (+ tokenizer), one task
#   2. preprocess megatron-prm preprocess: tokenize the JSONL once into a store, one task
#   3. train      one srun task per node, each starting torchrun with 8 processes
#   4. export     megatron-prm convert-hf export: the trained PRM -> HF safetensors
#   5. score      megatron-prm score on the dev set with TP ranks of one node
#
# Time limit and preemption: 10 minutes before the limit SLURM sends SIGUSR1 to this script
# (--signal=B:USR1@600), which forwards it to the training processes (scancel --signal, all processes
# of the job steps). torchrun ignores it (`trap '' USR1` before exec: by default SIGUSR1 would kill
# torchrun, and torchrun starts its workers in sessions of their own, so a signal to it alone would not
# reach them); each worker saves a checkpoint at the end of its current step and exits 0. The script then
# requeues the job (scontrol requeue; --requeue) and the next run continues from `latest`
# (resume_from_checkpoint auto; a first run starts fresh). SIGTERM (preemption) is handled the same way
# by the trainer.
#
# Environment: CUDA_DEVICE_MAX_CONNECTIONS=1 lets tensor-parallel communication overlap compute in
# order (Megatron-Core needs it with TP/SP). NCCL: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA to the
# cluster's interfaces if NCCL picks the wrong ones; NCCL_DEBUG=WARN (INFO to debug hangs);
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1 makes a failed rank stop the job instead of hanging it.
set -euo pipefail

# ---- what to train, where, and how to split it (override any of them from the environment) ----
HF_MODEL=${HF_MODEL:-}                                     # HF directory: config.json, *.safetensors, tokenizer
DATA=${DATA:-data/math_shepherd.jsonl}                     # {src, tgt, responses, labels} records
DEV_DATA=${DEV_DATA:-data/dev.jsonl}
WORK=${WORK:-work/llama3-8b-prm}                           # converted checkpoint, store, run, export
CONFIG=${CONFIG:-examples/configs/llama3_8b_prm.yaml}
NODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}                          # processes per node
DEVICE=${DEVICE:-cuda}                                     # cpu: the CPU mode (gloo), for tests
GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-80}
TP=${TP:-8}
CP=${CP:-1}                                                # context parallelism: long traces (see qwen2_5_7b_prm_32k.yaml)
EP=${EP:-1}                                                # expert parallelism: MoE bases (MODEL_SHAPE=examples/configs/qwen3_30b_a3b_config.json TP=1 EP=8)
PP=${PP:-1}
VPP=${VPP:-1}
SEQ_LEN=${SEQ_LEN:-4096}
PROMPT_LEN=${PROMPT_LEN:-2048}                             # max_prompt_len: the store and the run must agree
FP8=${FP8:-0}                                              # 1: FP8 (hybrid) through Transformer Engine
MASTER_PORT=${MASTER_PORT:-29500}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}

export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

CHECKPOINT=$WORK/checkpoint
STORE=$WORK/store/train
RUN=$WORK/run
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  # No pipe into head: under pipefail, scontrol killed by SIGPIPE would fail the job at random.
  HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  MASTER_ADDR=${HOSTS%%$'\n'*}
else
  MASTER_ADDR=127.0.0.1
fi

RUN_ARGS=(
  --model_name_or_path "$CHECKPOINT" --train_dataset_path "$STORE" --dev_dataset_path "$DEV_DATA"
  --output_dir "$RUN" --tensor_parallel_degree "$TP" --context_parallel_degree "$CP" --pipeline_parallel_degree "$PP"
  --expert_parallel_degree "$EP"
  --virtual_pp_degree "$VPP" --max_seq_len "$SEQ_LEN" --max_prompt_len "$PROMPT_LEN" --device "$DEVICE"
  --resume_from_checkpoint auto
)
if [[ "$FP8" == 1 ]]; then
  RUN_ARGS+=(--fp8 hybrid)
fi

# The plan needs only the model's shape: MODEL_SHAPE (an HF config.json), else HF_MODEL's, else (a dry run
# without HF_MODEL) the shipped Llama-3-8B one.
MODEL_SHAPE=${MODEL_SHAPE:-${HF_MODEL:+$HF_MODEL/config.json}}
if [[ -z "$MODEL_SHAPE" && "$DRY_RUN" != 1 ]]; then
  echo "set HF_MODEL to the Hugging Face model directory to train from" >&2
  exit 2
fi
echo "== plan: $NODES node(s) x $GPUS_PER_NODE GPUs"
"$PYTHON" -m megatron_prm plan --config "$CONFIG" --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" \
  --gpu-memory-gib "$GPU_MEMORY_GIB" "${RUN_ARGS[@]}" --model_name_or_path null \
  --model_config "${MODEL_SHAPE:-examples/configs/llama3_8b_config.json}"

torchrun_command() {  # the torchrun line of node $1
  echo "torchrun --nnodes $NODES --nproc-per-node $GPUS_PER_NODE --node-rank $1 --master-addr $MASTER_ADDR" \
    "--master-port $MASTER_PORT -m megatron_prm train $CONFIG ${RUN_ARGS[*]}"
}

if [[ "$DRY_RUN" == 1 ]]; then
  for ((node = 0; node < NODES; node++)); do
    echo "node $node: $(torchrun_command "$node")"
  done
  exit 0
fi

if [[ ! -f "$CHECKPOINT/model_config.json" ]]; then
  echo "== convert $HF_MODEL"
  srun --nodes 1 --ntasks 1 "$PYTHON" -m megatron_prm convert-hf import --hf "$HF_MODEL" --out "$CHECKPOINT" \
    --tp "$TP" --pp "$PP"
fi
if [[ ! -f "$STORE.meta.json" ]]; then
  echo "== preprocess $DATA"
  mkdir -p "$(dirname "$STORE")"
  srun --nodes 1 --ntasks 1 "$PYTHON" -m megatron_prm preprocess --data "$DATA" --tokenizer "$CHECKPOINT/tokenizer" \
    --output-prefix "$STORE" --max-seq-len "$SEQ_LEN" --max-prompt-len "$PROMPT_LEN" --workers "${SLURM_CPUS_PER_TASK:-8}"
fi

echo "== train"
# One task per node; SLURM_NODEID, expanded inside each task (hence the single quotes), is the node rank.
# In the background, so that the USR1 trap runs at once; `wait` returns early when it does.
REQUEUE=0
trap 'REQUEUE=1; echo "== time limit near: training saves and stops"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
# shellcheck disable=SC2016
srun --ntasks-per-node 1 bash -c "trap '' USR1; exec $(torchrun_command '$SLURM_NODEID')" &
TRAIN_PID=$!
TRAIN_STATUS=0
while kill -0 "$TRAIN_PID" 2>/dev/null; do
  if wait "$TRAIN_PID"; then TRAIN_STATUS=0; else TRAIN_STATUS=$?; fi
done
if [[ "$REQUEUE" == 1 ]]; then
  echo "== saved; requeueing job $SLURM_JOB_ID (the next run resumes from $RUN/latest)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
if [[ "$TRAIN_STATUS" != 0 ]]; then
  exit "$TRAIN_STATUS"
fi

echo "== export and score"
srun --nodes 1 --ntasks 1 "$PYTHON" -m megatron_prm convert-hf export --megatron "$RUN" --out "$WORK/hf"
srun --nodes 1 --ntasks 1 torchrun --standalone --nproc-per-node "$TP" -m megatron_prm score --checkpoint "$RUN" \
  --data "$DEV_DATA" --output "$WORK/dev_scores.jsonl" --tensor_parallel_degree "$TP" --device "$DEVICE"
"$PYTHON" -m megatron_prm evaluate --scores "$WORK/dev_scores.jsonl" --benchmark steps
