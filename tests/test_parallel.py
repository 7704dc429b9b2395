"""Every parallel layout against a single-process run of the same tiny model, data and initial weights.

The initial weights are written once (tests/init_checkpoint.py) and loaded by every run, through
Megatron-Core's layout-independent checkpoint. The good and bad reward tokens ("+" = 648 and
"Device" = 20000) lie on different tensor-parallel ranks when the 32,000-row vocabulary is split in two.
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import MISTRAL, REPO, read_log, run_cli
from megatron_prm.data.synthetic import write_dataset

BASE = {
    "tokenizer_name_or_path": MISTRAL, "reward_tokens": "+,Device", "num_hidden_layers": 4, "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "max_seq_len": 128,
    "max_prompt_len": 64, "device": "cpu", "bf16": False, "learning_rate": 1e-3, "max_steps": 3,
    "logging_steps": 1, "eval_steps": 100, "save_steps": 100, "seed": 5,
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
}
# name: (processes, overrides); every case keeps the global batch of 8 records.
CASES = {
    "tp2": (2, {"tensor_parallel_degree": 2}),
    "tp2_sp": (2, {"tensor_parallel_degree": 2, "sequence_parallel": True}),
    "pp2": (2, {"pipeline_parallel_degree": 2}),
    "pp2_vpp2": (2, {"pipeline_parallel_degree": 2, "virtual_pp_degree": 2}),
    "dp2_distributed_optimizer": (2, {"sharding": "stage1", "gradient_accumulation_steps": 2}),
    "tp2_dp2": (4, {"tensor_parallel_degree": 2, "gradient_accumulation_steps": 2}),
    "pp2_dp2": (4, {"pipeline_parallel_degree": 2, "gradient_accumulation_steps": 2}),
    "cp2": (2, {"context_parallel_degree": 2}),
    "cp2_tp2_sp": (4, {"context_parallel_degree": 2, "tensor_parallel_degree": 2, "sequence_parallel": True}),
    "cp2_pp2": (4, {"context_parallel_degree": 2, "pipeline_parallel_degree": 2}),
    "cp2_dp2": (4, {"context_parallel_degree": 2, "gradient_accumulation_steps": 2}),  # the data of DP2
    "full_recompute": (1, {"recompute": True, "recompute_granularity": "full", "recompute_num_layers": 2}),
    "selective_recompute": (1, {"recompute": True, "recompute_granularity": "core_attn"}),
    "attention_block_recompute": (1, {"recompute": True, "recompute_granularity": "full_attn"}),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    for name, count, seed in (("train", 64, 3), ("dev", 16, 4)):
        path = write_dataset(folder / f"{name}.jsonl", count, seed=seed)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        # Soft-label form of the same labels: the bad reward token here is "Device", not "-".
        path.write_text("".join(json.dumps({**r, "labels": [float(x == "+") for x in r["labels"]]}) + "\n" for r in rows))
    config = {**BASE, "train_dataset_path": str(folder / "train.jsonl"), "dev_dataset_path": str(folder / "dev.jsonl")}
    (folder / "base.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, str(REPO / "tests" / "init_checkpoint.py"), str(folder / "base.json"),
                    str(folder / "init")], check=True, capture_output=True, cwd=REPO)
    return folder


def train(workdir, name, nproc, **overrides):
    output = workdir / name
    args = ["train", str(workdir / "base.json"), "--model_name_or_path", str(workdir / "init"),
            "--output_dir", str(output)]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    result = run_cli(args, nproc=nproc)
    last = result.stdout.strip().splitlines()[-1]
    return output, json.loads(last) if last.startswith("{") else None


@pytest.fixture(scope="module")
def reference(workdir):
    return train(workdir, "reference", 1)


def saved_weights(checkpoint):
    """A saved model loaded into one process (tensor and pipeline size 1), by parameter name."""
    from megatron_prm.checkpoint import load_model_weights
    from megatron_prm.config import ModelArguments
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.model.architecture import resolve_architecture
    from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
    from megatron_prm.runtime import init_runtime, shutdown

    arch = resolve_architecture(ModelArguments(model_name_or_path=str(checkpoint)), 32000, BASE["max_seq_len"])
    init_runtime("cpu", 0, ParallelLayout())
    try:
        model = build_model_chunks(arch, (648, 20000), BASE["max_seq_len"], ModelBuildOptions(use_cpu_initialization=True))[0]
        load_model_weights([model], checkpoint)
        return {name: p.detach().clone() for name, p in model.named_parameters()}
    finally:
        shutdown()


PACKED = {"greedy_zero_padding": True, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}
PACKED_CASES = {
    "packed_tp2_sp": (2, {**PACKED, "tensor_parallel_degree": 2, "sequence_parallel": True}),
    "packed_pp2": (2, {**PACKED, "pipeline_parallel_degree": 2}),
    "packed_dp2": (2, {**PACKED, "gradient_accumulation_steps": 2}),
}


@pytest.fixture(scope="module")
def packed_reference(workdir):
    return train(workdir, "packed_reference", 1, **PACKED)


# CP x TP and CP x PP train in `make test` only: tests/test_context_parallel.py compares their logits and every
# gradient with one process at 1e-6 in both legs.
ONE_LEG_CASES = {"cp2_tp2_sp", "cp2_pp2"}


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.one_leg) if case in ONE_LEG_CASES else case
                                  for case in CASES])
def test_layout_matches_single_process(workdir, reference, case):
    nproc, overrides = CASES[case]
    assert_matches(workdir, reference, *train(workdir, case, nproc, **overrides))


@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_packed_layout_matches_single_process(workdir, packed_reference, case):
    nproc, overrides = PACKED_CASES[case]
    assert_matches(workdir, packed_reference, *train(workdir, case, nproc, **overrides))


def assert_matches(workdir, reference, output, metrics):
    expected, got = read_log(reference[0], "train"), read_log(output, "train")
    assert [s["step"] for s in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        assert (a["labelled_steps"], a["tokens"]) == (b["labelled_steps"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}"
    assert metrics["loss"] == pytest.approx(reference[1]["loss"], rel=1e-5)
    assert metrics["steps"] == reference[1]["steps"]
    initial, ours, theirs = (saved_weights(path) for path in (workdir / "init", reference[0], output))
    assert ours.keys() == theirs.keys()
    for name in ours:
        # Adam divides by the gradient's running RMS, so an element whose gradient is near zero moves by
        # up to the learning rate on rounding noise alone: compare against the size of the update. Torch
        # 2.14.1 (the Python 3.12 leg) measured 3.0e-3 of the update on packed TP2 + SP's linear_proj.
        update = (ours[name] - initial[name]).abs().max().item()
        assert update > 0, f"{name} did not train"
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=5e-3 * update, msg=name)


@pytest.mark.parametrize("precision, tolerance", [({"bf16": True}, 0.02), ({"fp16": True, "scale_loss": 1024.0}, 0.02),
                                                  ({"fp16": True, "fp16_opt_level": "O1", "scale_loss": 1024.0}, 0.02)])
def test_half_precision_stays_within_tolerance_of_fp32(workdir, reference, precision, tolerance):
    name = "_".join(f"{k}{v}" for k, v in precision.items())
    output, _ = train(workdir, name, 1, **precision)
    for a, b in zip(read_log(reference[0], "train"), read_log(output, "train")):
        assert not b["skipped"]
        assert b["loss"] == pytest.approx(a["loss"], rel=tolerance)


def test_fp16_dynamic_loss_scale_backs_off_after_overflow(workdir):
    output, _ = train(workdir, "fp16_overflow", 1, fp16=True, scale_loss=2.0 ** 15, max_steps=8, dev_dataset_path="null")
    steps = read_log(output, "train")
    assert steps[0]["skipped"]  # 2**15 overflows this model's fp16 gradients
    assert not steps[-1]["skipped"] and steps[-1]["loss_scale"] < 2.0 ** 15
