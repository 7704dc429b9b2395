"""Checkpoint work spread over ranks (issue 21), in one process: integrity checks split by file, the
non-finite gradient check without a full-size temporary, and what plan says a save costs."""

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_prm import checkpoint_manifest
from megatron_prm.checkpoint_manifest import verify_checkpoint, write_manifest
from megatron_prm.megatron_compat import local_gradients_finite


@pytest.fixture
def sealed(tmp_path):
    directory = tmp_path / "iter_0000001"
    directory.mkdir()
    for index in range(7):
        (directory / f"__{index}_0.distcp").write_bytes(bytes([index]) * (1000 + index))
    (directory / "common.pt").write_bytes(b"common")
    write_manifest(directory)
    return directory


def test_each_file_is_checked_by_exactly_one_rank(sealed, monkeypatch):
    checked: list[str] = []
    real = checkpoint_manifest.file_crc32
    monkeypatch.setattr(checkpoint_manifest, "file_crc32", lambda path: checked.append(path.name) or real(path))
    for rank in range(3):
        assert verify_checkpoint(sealed, share=(rank, 3)) == []
    listed = json.loads((sealed / "manifest.json").read_text())["files"]
    assert sorted(checked) == sorted(listed)  # every file read once, by one of the three ranks

    (sealed / "__2_0.distcp").write_bytes(b"x" * 1002)  # same size, other bytes
    (sealed / "__5_0.distcp").unlink()
    (sealed / "stray.bin").write_bytes(b"?")
    shares = [verify_checkpoint(sealed, share=(rank, 3)) for rank in range(3)]
    assert sorted(p for share in shares for p in share) == sorted(verify_checkpoint(sealed))
    assert sum(len(share) for share in shares) == 3  # each problem found by one rank only
    assert any("stray.bin: not in manifest.json" in p for p in shares[0])  # the listing: rank 0's alone


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_single_non_finite_gradient_is_found(value):
    buffers = [SimpleNamespace(grad_data=torch.zeros(10_000)), SimpleNamespace(grad_data=torch.ones(3, dtype=torch.bfloat16))]
    chunk = SimpleNamespace(buffers=buffers, expert_parallel_buffers=[])
    assert local_gradients_finite([chunk])
    buffers[1].grad_data[2] = value
    assert not local_gradients_finite([chunk])
    buffers[1].grad_data[2] = 1e30  # large but finite
    assert local_gradients_finite([chunk])


def test_plan_counts_checkpoint_bytes_per_rank_and_what_unified_gathers(tmp_path):
    from megatron_prm.config import load_config
    from megatron_prm.model.architecture import resolve_architecture
    from megatron_prm.plan import plan

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "max_seq_len": 256,
                                "bf16": True, "sharding": "stage1"}))
    arch = resolve_architecture(load_config(path).model, 1000, 256)

    def figures(*args) -> dict:
        return plan(load_config(path, list(args)), arch, nodes=1, gpus_per_node=4, gpu_memory_gib=80)

    result = figures()
    params = result["parameters_per_gpu"]
    saved = result["checkpoint"]
    assert saved["checkpoint_bytes"] == params * (2 + 12)  # bf16 weights, fp32 main weights and two moments
    assert saved["written_per_rank_bytes"] == -(-saved["checkpoint_bytes"] // 4)  # DP4: a quarter each
    assert saved["host_staging_per_rank_bytes"] == 0 and saved["gathered_on_data_parallel_rank0_bytes"] == 0
    assert figures("--async_save", "true")["checkpoint"]["host_staging_per_rank_bytes"] == saved["written_per_rank_bytes"]
    assert figures("--unified_checkpoint", "true")["checkpoint"]["gathered_on_data_parallel_rank0_bytes"] == 12 * params
    tp2 = figures("--tensor_parallel_degree", "2")["checkpoint"]
    assert tp2["checkpoint_bytes"] == pytest.approx(saved["checkpoint_bytes"], rel=0.02)  # the same model, split
