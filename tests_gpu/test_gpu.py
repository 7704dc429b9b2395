"""The GPU path (`make test-gpu`): bf16 training on CUDA, packed rows through flash varlen attention,
Megatron against transformers, and tensor parallelism over two GPUs (skipped, with the reason, on one).

These tests only run where CUDA is available (tests_gpu/conftest.py stops the session otherwise). They
use Megatron-Core's local layer spec, as on a GPU without Transformer Engine; with TE installed the
training runs use TE's spec instead.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_module, train_log
from megatron_prm.data.batching import collate, collate_packed
from megatron_prm.data.packing import PackingOptions, pack
from megatron_prm.data.samples import Sample
from megatron_prm.loss import step_losses
from megatron_prm.model.architecture import Architecture

TINY_RUN = {
    "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_seq_len": 128, "max_prompt_len": 64, "device": "cuda", "bf16": True,
    "learning_rate": 3e-3, "warmup_steps": 2, "lr_scheduler_type": "constant", "max_steps": 40, "logging_steps": 1,
    "eval_steps": 1000, "save_steps": 1000, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
    "seed": 3,
}
ARCH = Architecture(
    num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
    head_dim=16, vocab_size=512, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, initializer_range=0.02,
)
GOOD, BAD, PLACEHOLDER = 7, 200, 3


def write_config(folder, data, name, **overrides):
    config = {**TINY_RUN, "tokenizer_name_or_path": str(data["tokenizer"]), "train_dataset_path": str(data["train"]),
              "dev_dataset_path": str(data["dev"]), "output_dir": str(folder / name), **overrides}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def test_bf16_training_on_cuda_lowers_the_loss(data, tmp_path):
    """The real training command on one GPU in bf16: 40 steps over 16 records (memorisation). On the CPU
    the same run goes from 0.70 to 0.005 (mean of the first and of the last five steps)."""
    run_module(["train", str(write_config(tmp_path, data, "bf16"))])
    losses = [step["loss"] for step in train_log(tmp_path / "bf16")]
    assert len(losses) == 40 and all(np.isfinite(losses)), losses
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < 0.5 * first and last < 0.25, losses
    assert (tmp_path / "bf16" / "latest").read_text().strip() == "iter_0000040"


@pytest.fixture(scope="module")
def runtime():
    from megatron_prm.runtime import init_runtime, shutdown

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons below mean fp32
    yield init_runtime("cuda", seed=0)
    shutdown()


def bf16_model():
    from megatron_prm.model.provider import ModelBuildOptions, Precision, build_model_chunks

    return build_model_chunks(ARCH, (GOOD, BAD), 512, ModelBuildOptions(precision=Precision(bf16=True)))[0]


def sample(rng, length, n_labels, record_index):
    ids = rng.integers(10, 500, size=length).astype(np.int32)
    positions = np.sort(rng.choice(np.arange(2, length), size=n_labels, replace=False)).astype(np.int32)
    ids[positions] = PLACEHOLDER
    return Sample(ids, positions, rng.random(n_labels).astype(np.float32), np.arange(n_labels, dtype=np.int32),
                  record_index)


def count_varlen_calls(model, monkeypatch) -> list:
    calls = []
    for layer in model.decoder.layers:
        module = layer.self_attention.core_attention
        kernel = module.varlen_attn
        assert kernel is not None, "this torch has no torch.nn.attention.varlen (torch 2.10+ needed)"

        def counted(*args, _kernel=kernel, **kwargs):
            calls.append(args[3].tolist())
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(module, "varlen_attn", counted)
    return calls


def loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to("cuda")
        logits = model(batch.tokens, batch.position_ids, None, reward_index=batch.reward_index,
                       packed_seq_params=batch.packed_seq_params())
        losses = step_losses(logits, batch.label_values)
        losses.sum().backward()
        total += losses.sum().item()
        count += losses.numel()
    return total / count, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_rows_through_flash_varlen_match_unpacked_in_bf16(runtime, monkeypatch):
    torch.manual_seed(0)
    model = bf16_model()
    rng = np.random.default_rng(2)
    samples = [sample(rng, int(n), 3, i) for i, n in enumerate(rng.integers(20, 200, size=9))]
    options = PackingOptions(512, sample_multiple=8, row_multiple=16)
    rows = list(pack(((s, len(s)) for s in samples), "greedy_zero_padding", options, buffer_size=9))
    assert 1 < len(rows) < len(samples)
    packed_batches = [collate_packed(row, 0, options) for row in rows]
    calls = count_varlen_calls(model, monkeypatch)
    packed_loss, packed_grads = loss_and_grads(model, packed_batches)
    assert calls == [b.cu_seqlens_padded.tolist() for b in packed_batches for _ in model.decoder.layers]
    plain_loss, plain_grads = loss_and_grads(model, [collate(samples, pad_id=0)])
    assert np.isfinite(packed_loss) and packed_loss == pytest.approx(plain_loss, rel=2e-2)
    assert packed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        difference = (packed_grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert difference < 0.1, (name, difference.item())


def test_flash_varlen_equals_per_sample_sdpa_on_cuda(runtime):
    """The kernel-level comparison in bf16, forward and backward, at the real positions of a packed row."""
    model = bf16_model()
    module = model.decoder.layers[0].self_attention.core_attention
    rng = np.random.default_rng(5)
    batch = collate_packed([sample(rng, n, 2, i) for i, n in enumerate((37, 120, 9, 64))], 0,
                           PackingOptions(512, sample_multiple=8, row_multiple=16)).to("cuda")
    params = batch.packed_seq_params()
    total = batch.tokens.shape[1]
    generator = torch.Generator(device="cuda").manual_seed(1)
    inputs = [torch.randn(total, heads, 16, device="cuda", generator=generator, dtype=torch.bfloat16)
              for heads in (8, 2, 2)]
    offsets, lengths = batch.cu_seqlens_padded[:-1].tolist(), (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    real = torch.cat([torch.arange(s, s + n) for s, n in zip(offsets, lengths)]).cuda()
    outputs, grads = [], []
    for attend in (module._packed_varlen, module._packed):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = attend(*leaves, params)
        # Only real positions count: varlen computes padding rows too (from their own sample), SDPA zeros.
        out.float()[real].square().sum().backward()
        outputs.append(out.float())
        grads.append([leaf.grad.float() for leaf in leaves])
    assert torch.isfinite(outputs[0]).all()
    torch.testing.assert_close(outputs[0][real], outputs[1][real], rtol=2e-2, atol=2e-2)
    for varlen_grad, sdpa_grad in zip(*grads):
        torch.testing.assert_close(varlen_grad[real], sdpa_grad[real], rtol=5e-2, atol=5e-2)


def test_no_attention_crosses_sample_boundaries_on_cuda(runtime):
    model = bf16_model()
    rng = np.random.default_rng(3)
    samples = [sample(rng, n, 2, i) for i, n in enumerate((40, 60, 50))]
    changed = Sample(samples[1].input_ids.copy(), samples[1].label_positions, samples[1].label_values,
                     samples[1].step_ids, 1)
    changed.input_ids[[0, 5, 11]] = (changed.input_ids[[0, 5, 11]] + 17) % 480 + 10  # placeholders untouched
    outputs = []
    with torch.no_grad():
        for row in (samples, [samples[0], changed, samples[2]]):
            batch = collate_packed(row, 0, PackingOptions(512)).to("cuda")
            outputs.append(model(batch.tokens, batch.position_ids, None, reward_index=batch.reward_index,
                                 packed_seq_params=batch.packed_seq_params()))
    first, second = outputs
    torch.testing.assert_close(first[:2], second[:2], rtol=0, atol=1e-3)
    torch.testing.assert_close(first[4:], second[4:], rtol=0, atol=1e-3)
    assert (first[2:4] - second[2:4]).abs().max() > 1e-2


HF_SHAPE = dict(vocab_size=1100, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
                rope_theta=500000.0)


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory, data):
    """A tiny random Llama-3-shaped model saved by transformers and imported in fp32 and in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**HF_SHAPE)).save_pretrained(root / "hf")
    (root / "hf" / "tokenizer.model").write_bytes(data["tokenizer"].read_bytes())
    for dtype in ("fp32", "bf16"):
        subprocess.run([sys.executable, "tools/convert_hf.py", "--no-progress", "import", "--hf", str(root / "hf"),
                        "--out", str(root / dtype), "--dtype", dtype], cwd=REPO, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return root


def megatron_model(checkpoint, bf16: bool, transformer_engine: bool = False):
    from megatron_prm.checkpoint import MODEL_CONFIG_NAME, load_model_weights
    from megatron_prm.model.architecture import read_hf_config
    from megatron_prm.model.provider import ModelBuildOptions, Precision, build_model_chunks

    config_path = checkpoint / MODEL_CONFIG_NAME
    arch = Architecture.from_hf_config(read_hf_config(config_path), str(config_path))
    chunks = build_model_chunks(arch, (0, 1), 256, ModelBuildOptions(precision=Precision(bf16=bf16),
                                                                     use_transformer_engine=transformer_engine))
    load_model_weights(chunks, checkpoint, arch)
    chunks[0].eval()
    return chunks[0]


def test_megatron_logits_equal_transformers_on_cuda(runtime, hf_checkpoints):
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, HF_SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(7)).cuda()
    positions = torch.arange(64, device="cuda").expand(2, 64)
    hf = AutoModelForCausalLM.from_pretrained(hf_checkpoints / "hf", dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        expected = hf(tokens).logits
        ours = megatron_model(hf_checkpoints / "fp32", bf16=False)(tokens, positions)  # [s, b, padded vocab]
    ours = ours.transpose(0, 1)[..., : HF_SHAPE["vocab_size"]]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)

    # bf16: two samples packed into one row (flash varlen, RoPE restarting) against transformers per sample.
    hf = AutoModelForCausalLM.from_pretrained(hf_checkpoints / "hf", dtype=torch.bfloat16).cuda().eval()
    rng = np.random.default_rng(8)
    samples = [sample(rng, n, 1, i) for i, n in enumerate((48, 80))]
    batch = collate_packed(samples, 0, PackingOptions(256, sample_multiple=8)).to("cuda")
    with torch.no_grad():
        packed = megatron_model(hf_checkpoints / "bf16", bf16=True)(
            batch.tokens, batch.position_ids, packed_seq_params=batch.packed_seq_params())[:, 0].float()
        for start, item in zip(batch.cu_seqlens_padded[:-1].tolist(), samples):
            ids = torch.from_numpy(item.input_ids.astype(np.int64)).cuda().unsqueeze(0)
            reference = hf(ids).logits[0].float()
            mine = packed[start:start + len(item), : HF_SHAPE["vocab_size"]]
            assert (mine - reference).abs().max() < 0.05 * reference.abs().max(), start


def test_moe_logits_equal_transformers_on_cuda(runtime, tmp_path):
    """A tiny Qwen2-MoE (4 experts, top 2, a shared expert, the first layer dense) imported and run on the GPU:
    Megatron-Core's MoE layer (all-to-all dispatcher; with Transformer Engine where it is installed, its layer
    spec, grouped GEMM and the pre-MLP norm under TE's checkpoint name) gives transformers' logits."""
    import importlib.util

    from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    from megatron_prm.conversion.importer import import_hf

    torch.manual_seed(0)
    Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[0], max_position_embeddings=256, initializer_range=0.1,
    )).save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "megatron", progress=False)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(7)).cuda()
    positions = torch.arange(64, device="cuda").expand(2, 64)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        expected = hf(tokens).logits
        model = megatron_model(tmp_path / "megatron", bf16=False,
                               transformer_engine=importlib.util.find_spec("transformer_engine") is not None)
        ours = model(tokens, positions).transpose(0, 1)[..., :512]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"tensor parallelism 2 needs 2 GPUs; this machine has {torch.cuda.device_count()}")
def test_tensor_parallel_2_matches_one_gpu(data, tmp_path):
    """TP2 + sequence parallel over NCCL against one GPU, from the same initial weights, in fp32."""
    base = write_config(tmp_path, data, "base", bf16=False, max_steps=3)
    subprocess.run([sys.executable, str(REPO / "tests" / "init_checkpoint.py"), str(base), str(tmp_path / "init")],
                   cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)})  # written on the CPU
    runs = {}
    for name, nproc, extra in (("tp1", 1, []), ("tp2", 2, ["--tensor_parallel_degree", "2", "--sequence_parallel", "true"])):
        run_module(["train", str(base), "--model_name_or_path", str(tmp_path / "init"),
                    "--output_dir", str(tmp_path / name), *extra], nproc=nproc)
        runs[name] = [step["loss"] for step in train_log(tmp_path / name)]
    assert len(runs["tp2"]) == 3
    assert runs["tp2"] == pytest.approx(runs["tp1"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"context parallelism 2 needs 2 GPUs; this machine has {torch.cuda.device_count()}")
@pytest.mark.parametrize("packed", [False, True])
def test_context_parallel_2_matches_one_gpu(data, tmp_path, packed):
    """CP2 over NCCL against one GPU, from the same initial weights, in fp32: Transformer Engine's
    context-parallel attention where TE is installed, the package's all-gather attention where it is not."""
    base = write_config(tmp_path, data, "base", bf16=False, max_steps=3)
    subprocess.run([sys.executable, str(REPO / "tests" / "init_checkpoint.py"), str(base), str(tmp_path / "init")],
                   cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)})  # written on the CPU
    packing = ["--greedy_zero_padding", "true", "--per_device_train_batch_size", "1"] if packed else []
    runs = {}
    for name, nproc, extra in (("cp1", 1, []), ("cp2", 2, ["--context_parallel_degree", "2"])):
        run_module(["train", str(base), "--model_name_or_path", str(tmp_path / "init"),
                    "--output_dir", str(tmp_path / name), *packing, *extra], nproc=nproc)
        runs[name] = [(step["loss"], step["tokens"]) for step in train_log(tmp_path / name)]
    assert len(runs["cp2"]) == 3
    if not packed:  # packed rows pad each sample to 2 x CP, which may pack other rows
        assert [t for _, t in runs["cp2"]] == [t for _, t in runs["cp1"]]
        assert [loss for loss, _ in runs["cp2"]] == pytest.approx([loss for loss, _ in runs["cp1"]], rel=1e-3)
