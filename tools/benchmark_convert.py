#!/usr/bin/env python
"""Peak memory and time of tools/convert_hf.py on a ~1B-parameter Llama-shaped checkpoint.

Writes a random HF checkpoint (TinyLlama-1.1B shape by default: 22 layers, hidden 2048, FFN 5632,
32 heads, 4 KV heads, vocab 32,000; bf16, two safetensors shards with an index) into --workdir,
then runs ``import`` and ``export`` each in its own process and reads that process's peak resident
memory (``wait4``). The last line is JSON; ``peak_rss_over_checkpoint_bytes`` is the larger peak
over the checkpoint's size on disk (target <= 0.35).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_prm.cli import ArgumentParser  # noqa: E402
from megatron_prm.conversion.mapping import LLAMA_RULES, hf_shapes  # noqa: E402
from megatron_prm.conversion.safetensors_io import PlannedTensor, ShardedSafetensorsWriter  # noqa: E402
from megatron_prm.model.architecture import Architecture  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "initializer_range": 0.02, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}


def write_random_checkpoint(directory: Path, layers: int) -> int:
    config = {**CONFIG, "num_hidden_layers": layers}
    arch = Architecture.from_hf_config(config, "benchmark")
    planned = []
    for rule in LLAMA_RULES:
        for layer in range(layers) if rule.per_layer else [None]:
            planned += [PlannedTensor(name, torch.bfloat16, shape)
                        for name, shape in zip(rule.hf_names(layer), hf_shapes(rule, arch))]
    total = sum(t.nbytes for t in planned)
    directory.mkdir(parents=True)
    writer = ShardedSafetensorsWriter(directory, planned, max_shard_bytes=total // 2 + 1)
    generator = torch.Generator().manual_seed(0)
    for tensor in planned:
        writer.write(tensor.name, (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return total


# Runs a script and, at exit, writes its VmHWM (peak resident set since exec; ru_maxrss would also count
# the pages the child shared with this process before exec).
_PEAK_RUNNER = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def record():
    with open('/proc/self/status') as status:
        peak_kib = next(line.split()[1] for line in status if line.startswith('VmHWM'))
    with open(out, 'w') as handle:
        handle.write(peak_kib)
atexit.register(record)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def measured(script_and_args: list[str], workdir: Path) -> tuple[float, int]:
    """Wall seconds and peak resident bytes of one child process running a Python script."""
    peak_file = workdir / "peak_kib"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _PEAK_RUNNER, str(peak_file), *script_and_args], cwd=REPO,
                            stdout=subprocess.DEVNULL)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(script_and_args)} failed")
    return time.perf_counter() - started, int(peak_file.read_text()) * 1024


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/megatron-prm-convert-benchmark"),
                        help="where the model and its conversions are written")
    parser.add_argument("--layers", type=int, default=22, help="layers of the synthetic model")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, megatron, exported = args.workdir / "hf", args.workdir / "megatron", args.workdir / "exported"
    print(f"writing a random {args.layers}-layer Llama-shaped checkpoint to {hf} ...", flush=True)
    checkpoint_bytes = write_random_checkpoint(hf, args.layers)
    params = checkpoint_bytes // 2
    tool = ["tools/convert_hf.py", "--no-progress"]
    imports_only = args.workdir / "imports_only.py"
    imports_only.write_text("import megatron_prm.conversion.importer, megatron_prm.conversion.exporter\n")
    _, baseline = measured([str(imports_only)], args.workdir)
    import_s, import_rss = measured(tool + ["import", "--hf", str(hf), "--out", str(megatron)], args.workdir)
    export_s, export_rss = measured(tool + ["export", "--megatron", str(megatron), "--out", str(exported)], args.workdir)
    gib = 2**30
    print(f"checkpoint: {params / 1e9:.2f}B parameters, {checkpoint_bytes / gib:.2f} GiB (bf16)")
    print(f"only importing the converter (Python, torch, megatron-core): peak RSS {baseline / gib:.2f} GiB")
    print(f"import: {import_s:.1f} s, peak RSS {import_rss / gib:.2f} GiB")
    print(f"export: {export_s:.1f} s, peak RSS {export_rss / gib:.2f} GiB")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print(json.dumps({
        "parameters": params, "checkpoint_bytes": checkpoint_bytes, "baseline_rss_bytes": baseline,
        "import_s": round(import_s, 1), "import_peak_rss_bytes": import_rss,
        "export_s": round(export_s, 1), "export_peak_rss_bytes": export_rss,
        "peak_rss_over_checkpoint_bytes": round(max(import_rss, export_rss) / checkpoint_bytes, 3),
    }))


if __name__ == "__main__":
    main()
