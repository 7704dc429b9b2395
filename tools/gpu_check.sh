#!/usr/bin/env bash
# The GPU check in one call, for a machine with one NVIDIA GPU and no network (the `device` tool's
# machine: Python 3.12 with a CUDA torch, no megatron-core, no Transformer Engine).
#
# Prepare the wheels where pip works (megatron-core needs only torch, numpy and packaging, all there):
#   echo /.whl/ >> .git/info/exclude
#   for v in 0.16.1 0.19.2; do python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl "megatron-core==$v"; done
# Then run, carrying .whl (one version per call keeps each call well inside 10 minutes):
#   bash tools/gpu_check.sh 0.16.1        # then: bash tools/gpu_check.sh 0.19.2
#
# For each megatron-core version given (default: 0.16.1 then 0.19.2) it installs that wheel into a folder
# of its own, runs `make test-gpu` with the machine's Python and the benchmark (Llama-3-8B's layer shape
# and vocabulary, 8 of its 32 layers, packed 4,096-token rows, bf16, PRM and LM modes, with the profile
# of a PRM step). Logs and the benchmark's JSON go to $OUT (default /tmp/gpu_check); summary.txt has one
# line per check. Exit status: 0 only if every check passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-/tmp/gpu_check}
PYTHON=${GPU_PYTHON:-python3}
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(0.16.1 0.19.2)
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
mkdir -p "$OUT"
summary="$OUT/summary.txt"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} 2>&1 | tee -a "$summary"

status=0
record() {  # record NAME EXIT_STATUS
    echo "$1: $([ "$2" -eq 0 ] && echo passed || echo "FAILED (exit $2)")" | tee -a "$summary"
    [ "$2" -eq 0 ] || status=1
}

for version in "${VERSIONS[@]}"; do
    wheel=$(find .whl -maxdepth 1 -name "megatron_core-$version-*cp312*.whl" 2>/dev/null | head -n 1)
    if [ -z "$wheel" ]; then
        echo "megatron-core $version: no cp312 wheel in .whl/ (see the header of this script)" | tee -a "$summary"
        status=1
        continue
    fi
    site="/tmp/megatron-core-$version"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheel" \
        > "/tmp/install-$version.log" 2>&1
    installed=$?
    record "megatron-core $version install" $installed
    [ $installed -eq 0 ] || { tail -n 5 "/tmp/install-$version.log" >> "$summary"; continue; }
    export PYTHONPATH="$site:$PWD"

    if command -v make > /dev/null; then
        timeout 300 make test-gpu GPU_PYTHON="$PYTHON" > "$OUT/test-gpu-$version.log" 2>&1
    else  # what the make target runs
        timeout 300 "$PYTHON" -m pytest -q tests_gpu > "$OUT/test-gpu-$version.log" 2>&1
    fi
    record "make test-gpu (megatron-core $version)" $?
    tail -n 3 "$OUT/test-gpu-$version.log" | tee -a "$summary"

    timeout 240 "$PYTHON" tools/benchmark.py --device cuda --bf16 --preset llama3-8b --layers 8 --seq-len 4096 \
        --sample-len 700 --step-len 60 --micro-batches 4 --warmup 2 --steps 5 --profile \
        > "$OUT/benchmark-$version.json" 2> "$OUT/benchmark-$version.log"
    record "benchmark (megatron-core $version)" $?
    grep -E "^(matrix|prm|lm|PRM)" "$OUT/benchmark-$version.log" | tee -a "$summary"
done
exit $status
