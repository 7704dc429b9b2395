"""The PRM head and loss on a tiny Megatron-Core model (one process, CPU mode)."""

import numpy as np
import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prm.config import TrainingArguments
from megatron_prm.data.batching import collate
from megatron_prm.data.samples import Sample
from megatron_prm.forward_step import make_train_forward_step
from megatron_prm.loss import prm_loss, step_losses
from megatron_prm.model.architecture import Architecture
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.runtime import init_runtime, shutdown
from megatron_prm.training_state import build_training_state

GOOD, BAD, PLACEHOLDER = 7, 200, 3
ARCH = Architecture(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=256, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, initializer_range=0.02,
)


@pytest.fixture(scope="module")
def runtime():
    yield init_runtime("cpu", seed=0)
    shutdown()


def tiny_model(arch=ARCH):
    return build_model_chunks(arch, (GOOD, BAD), 64, ModelBuildOptions(use_cpu_initialization=True))[0]


def random_sample(rng, length, n_labels, record_index, soft=False):
    ids = rng.integers(10, 250, size=length).astype(np.int32)
    positions = np.sort(rng.choice(np.arange(4, length), size=n_labels, replace=False)).astype(np.int32)
    ids[positions] = PLACEHOLDER
    values = rng.random(n_labels) if soft else (rng.random(n_labels) < 0.5)
    return Sample(ids, positions, values.astype(np.float32), np.arange(n_labels, dtype=np.int32), record_index)


@pytest.mark.parametrize("tied", [False, True])
def test_head_equals_full_vocabulary_softmax_restricted_to_reward_ids(runtime, tied):
    import dataclasses

    model = tiny_model(dataclasses.replace(ARCH, tie_word_embeddings=tied))
    rng = np.random.default_rng(0)
    batch = collate([random_sample(rng, 20, 3, 0), random_sample(rng, 14, 2, 1)], pad_id=0)
    with torch.no_grad():
        head = model(batch.tokens, batch.position_ids, None, reward_index=batch.reward_index)
        full = GPTModel.forward(model, batch.tokens, batch.position_ids, None)  # [b, s, V]
    rows, cols = batch.reward_index[:, 0], batch.reward_index[:, 1]
    restricted = full[rows, cols][:, [GOOD, BAD]]
    torch.testing.assert_close(head, restricted.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.softmax(head, -1), torch.softmax(restricted, -1), rtol=1e-5, atol=1e-6)


def test_soft_labels_reach_the_loss_as_floats():
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.5]], requires_grad=True)
    targets = torch.tensor([0.25, 1.0])
    loss_sum, count, report = prm_loss(targets, logits)
    log_p = torch.log_softmax(logits.detach(), -1)
    expected = -(0.25 * log_p[0, 0] + 0.75 * log_p[0, 1]) - log_p[1, 0]
    assert count.item() == 2
    torch.testing.assert_close(loss_sum.detach(), expected)
    loss_sum.backward()
    # d loss / d logit_good = P(good) - p for each step: the soft target enters as 0.25, not 0 or 1.
    p_good = torch.softmax(logits.detach(), -1)[:, 0]
    torch.testing.assert_close(logits.grad[:, 0], p_good - targets)
    rng = np.random.default_rng(1)
    batch = collate([random_sample(rng, 12, 3, 0, soft=True)], pad_id=0)
    assert batch.label_values.dtype == torch.float32 and not torch.all(batch.label_values == batch.label_values.round())


def test_zero_label_microbatch_gives_finite_zero_loss(runtime):
    model = tiny_model()
    rng = np.random.default_rng(2)
    batch = collate([random_sample(rng, 10, 0, 0)], pad_id=0)
    logits = model(batch.tokens, batch.position_ids, None, reward_index=batch.reward_index)
    loss_sum, count, _ = prm_loss(batch.label_values, logits)
    assert logits.shape == (0, 2) and count.item() == 0
    assert torch.isfinite(loss_sum) and loss_sum.item() == 0.0
    loss_sum.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_is_the_exact_mean_over_all_labelled_steps(runtime):
    """Microbatches with 0, 1 and 3 labelled steps: Megatron's gradient equals that of the plain mean."""
    torch.manual_seed(0)
    chunks = [tiny_model()]
    reference = tiny_model()
    reference.load_state_dict(chunks[0].state_dict())
    args = TrainingArguments(bf16=False, learning_rate=1e-3, max_steps=2, max_grad_norm=0.0)
    state = build_training_state(chunks, args, total_steps=2)
    rng = np.random.default_rng(3)
    batches = [collate([random_sample(rng, 12, n, i)], pad_id=0) for i, n in enumerate((0, 1, 3))]

    for chunk in state.model:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=make_train_forward_step(torch.device("cpu"), 0.5), data_iterator=iter(batches),
        model=state.model, num_microbatches=3, seq_length=12, micro_batch_size=1, forward_only=False)

    losses = torch.cat([step_losses(reference(b.tokens, b.position_ids, None, reward_index=b.reward_index),
                                    b.label_values) for b in batches])
    assert losses.numel() == 4
    losses.mean().backward()
    for (name, param), ref in zip(state.model[0].module.named_parameters(), reference.parameters()):
        expected = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        torch.testing.assert_close(param.main_grad, expected, rtol=1e-5, atol=1e-7, msg=name)


def test_head_under_tensor_parallel_moves_only_the_selected_rows(tmp_path):
    """TP2 and TP2 + sequence parallel (gloo, two processes; tests/tp_reward_head.py) against one process:
    logits and gradients equal to 1e-6, and the head's collectives carry the two reward rows ([2, h]) and,
    under sequence parallelism, the n selected rows ([n, h]); never the [s, b, h] hidden states."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, free_port
    from tp_reward_head import BATCH, HIDDEN, REWARD_INDEX, SEQ

    out = tmp_path / "head"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(REPO / "tests" / "tp_reward_head.py"), str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    n = len(REWARD_INDEX)
    for rank in range(2):
        report = json.loads((tmp_path / f"head.rank{rank}.json").read_text())
        for mode, expected_forward in (("tp", [["all_reduce", [2, HIDDEN]]]),
                                       ("sp", [["all_reduce", [n, HIDDEN]], ["all_reduce", [2, HIDDEN]]])):
            figures = report[mode]
            for name in ("logits_error", "hidden_grad_error", "weight_grad_error"):
                assert figures[name] <= 1e-6, (rank, mode, name, figures[name])
            assert figures["forward_collectives"] == expected_forward, (rank, mode)
            assert figures["backward_collectives"] == [], (rank, mode)
            # Each rank's weight gradient sits on the reward row it owns (ids 3 and 20 of 2 x 16 rows).
            assert figures["weight_grad_rows"] == [[3], [4]][rank], (rank, mode)
    assert SEQ * BATCH * HIDDEN > n * HIDDEN  # the recorded shapes are the selected rows, not the hidden states
