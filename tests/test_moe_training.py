"""PRM training on a Mixture-of-Experts base: expert parallelism (2 of 4 experts per rank, tokens exchanged
by all-to-all) trains exactly like one process holding every expert, gradient by gradient."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import MISTRAL, REPO, read_log, run_cli, run_script
from megatron_prm.data.synthetic import write_dataset

pytest.importorskip("transformers")
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

MAX_SEQ_LEN = 128
TRAIN = ["--tokenizer_name_or_path", MISTRAL, "--device", "cpu", "--bf16", "false", "--max_seq_len", str(MAX_SEQ_LEN),
         "--max_prompt_len", "64", "--learning_rate", "1e-3", "--warmup_steps", "0", "--max_steps", "3",
         "--per_device_train_batch_size", "2", "--do_eval", "false", "--logging_steps", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Qwen3-MoE with the Mistral vocabulary (4 experts, top 2), imported, and a dataset."""
    from megatron_prm.conversion.importer import import_hf

    folder = tmp_path_factory.mktemp("moe_training")
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=256)).save_pretrained(folder / "hf")
    import_hf(folder / "hf", folder / "base", progress=False)
    write_dataset(folder / "train.jsonl", 64, seed=1)
    return folder


EP2 = ("--gradient_accumulation_steps", "2", "--expert_parallel_degree", "2")


def train(workdir, name: str, nproc: int, *overrides: str):
    output = workdir / name
    run_cli(["train", "--model_name_or_path", str(workdir / "base"), "--train_dataset_path",
             str(workdir / "train.jsonl"), "--output_dir", str(output), *TRAIN, *overrides], nproc=nproc)
    return output


def saved_weights(checkpoint) -> dict[str, torch.Tensor]:
    """A saved model loaded into one process holding every expert, by parameter name."""
    from megatron_prm.checkpoint import load_model_weights
    from megatron_prm.config import ModelArguments
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.model.architecture import resolve_architecture
    from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
    from megatron_prm.runtime import init_runtime, shutdown

    arch = resolve_architecture(ModelArguments(model_name_or_path=str(checkpoint)), 32000, MAX_SEQ_LEN)
    init_runtime("cpu", 0, ParallelLayout())
    try:
        model = build_model_chunks(arch, (648, 387), MAX_SEQ_LEN, ModelBuildOptions(use_cpu_initialization=True))[0]
        load_model_weights([model], checkpoint)
        return {name: p.detach().clone() for name, p in model.named_parameters()}
    finally:
        shutdown()


def test_expert_parallel_training_equals_one_process(workdir):
    reference = train(workdir, "ep1", 1, "--gradient_accumulation_steps", "4")
    # Two ranks: data parallel 2 for the dense parameters, expert parallel 2 for the experts; the same
    # global batch of 8 records.
    # (A checkpoint at step 2 as well: test_expert_parallel_resume_is_bitwise resumes from it.)
    expert_parallel = train(workdir, "ep2", 2, *EP2, "--save_steps", "2")
    expected, got = read_log(reference, "train"), read_log(expert_parallel, "train")
    assert [s["step"] for s in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        assert (a["labelled_steps"], a["tokens"]) == (b["labelled_steps"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6), f"step {a['step']}"
        # The load-balancing loss (on by default: the base's router_aux_loss_coef) is logged on its own, as
        # transformers defines it: 2 (the top k) at perfect balance, at most the number of experts.
        assert b["moe_load_balancing_loss"] == pytest.approx(a["moe_load_balancing_loss"], rel=1e-6)
        assert 1.9 < a["moe_load_balancing_loss"] <= 4.0
    assert json.loads((expert_parallel / "iter_0000003" / "train_state.json").read_text())["step"] == 3
    initial, ours, theirs = (saved_weights(path) for path in (workdir / "base", reference, expert_parallel))
    assert ours.keys() == theirs.keys()
    assert any(".local_experts.3." in name for name in ours)  # the EP2 checkpoint reloads with every expert
    idle = []
    for name in ours:
        # Adam divides by the gradient's running RMS: compare against the size of the update.
        update = (ours[name] - initial[name]).abs().max().item()
        if update == 0:  # an expert no token was routed to in 3 steps: untouched in both runs
            idle.append(name)
            assert ".local_experts." in name and torch.equal(theirs[name], ours[name]), name
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=1e-3 * update, msg=name)
    assert len(idle) <= 2, idle


def expert_parallel_grads(out, ep: int, tp: int, pp: int, cp: int, aux: bool, reference=None) -> dict[str, torch.Tensor]:
    """tests/expert_parallel_grads.py's three training steps (see its docstring), in EP x TP x PP x CP processes."""
    script = [str(REPO / "tests" / "expert_parallel_grads.py"), str(out), str(ep), str(tp), str(pp), str(cp), str(int(aux)),
              *([str(reference)] if reference else [])]
    run_script(script, ep * tp * pp * cp)
    return load_file(out)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process references, with the load-balancing loss and without it."""
    folder = tmp_path_factory.mktemp("expert_parallel_grads")
    references = {}
    for aux in (True, False):
        references[aux] = folder / f"one_process_aux{int(aux)}.safetensors"
        expert_parallel_grads(references[aux], 1, 1, 1, 1, aux)
    return references


# EP2 alone: two data-parallel ranks, two experts each; with TP2 + SP (4 processes, experts whole on each
# tensor-parallel rank: expert_tensor_parallel_degree 1); with PP2 (4 processes; the dense layer on the first
# stage), without the load-balancing loss, which pipeline parallelism replaces by Megatron-Core's; and CP2
# alone (every expert on both ranks, each holding half of every sequence).
@pytest.mark.parametrize("ep, tp, pp, cp, aux", [(2, 1, 1, 1, True), (2, 2, 1, 1, True), (2, 1, 2, 1, False),
                                                 (1, 1, 1, 2, True)], ids=["ep2", "ep2_tp2_sp", "ep2_pp2", "cp2"])
def test_expert_parallel_gradients_equal_one_process(one_process, tmp_path, ep, tp, pp, cp, aux):
    """Three training steps of a Qwen2-MoE with a shared expert and a dense second layer against one process
    holding every expert and all four micro batches: every parameter's gradient (the tensor-parallel shards
    put together, layers and experts under their global indices) within 1e-6 at every step, and the losses,
    load-balancing losses and gradient norms within 1e-6 relative (measured: gradients within 6e-7, losses
    within 2.5e-7 relative)."""
    expected = load_file(one_process[aux])
    got = expert_parallel_grads(tmp_path / "parallel.safetensors", ep, tp, pp, cp, aux, one_process[aux])
    assert expected.keys() == got.keys()
    for key in (k for k in expected if k.startswith("param.")):
        assert torch.equal(got[key], expected[key]), key  # the same starting weights
    gradients = [key for key in expected if key.startswith("grad.")]
    assert {key.split(".", 2)[1] for key in gradients} == {"0", "1", "2"}
    assert sum(".local_experts.3." in key for key in gradients) == 3 * 3 * 2  # steps x sparse layers x fc1/fc2
    for key in gradients:
        assert expected[key].abs().max() > 0, key
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    figures = ("loss", "grad_norm") + (("moe_load_balancing_loss",) if aux else ())
    assert ("moe_load_balancing_loss.0" in expected) == aux
    for step in range(3):
        assert got[f"labelled_steps.{step}"] == expected[f"labelled_steps.{step}"]
        for figure in figures:
            assert got[f"{figure}.{step}"].item() == pytest.approx(expected[f"{figure}.{step}"].item(), rel=1e-6)


def test_expert_parallel_resume_is_bitwise(workdir):
    """The EP2 run resumed from its step-2 checkpoint (experts, their Adam state over expert-data-parallel
    ranks, router, RNG and data position restored) trains step 3 bitwise like the uninterrupted run."""
    straight = workdir / "ep2"
    if not (straight / "iter_0000002").is_dir():
        train(workdir, "ep2", 2, *EP2, "--save_steps", "2")
    resumed = train(workdir, "ep2_resumed", 2, *EP2, "--resume_from_checkpoint", str(straight / "iter_0000002"))
    expected, got = read_log(straight, "train")[-1], read_log(resumed, "train")
    assert [s["step"] for s in got] == [3]
    for key in ("loss", "grad_norm", "moe_load_balancing_loss", "labelled_steps", "tokens"):
        assert got[0][key] == expected[key], key
    ours, theirs = saved_weights(straight / "iter_0000003"), saved_weights(resumed / "iter_0000003")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_aux_loss_coefficient_reaches_the_gradients(workdir):
    """Coefficient 0 switches the load-balancing loss off (nothing logged, other gradients); a router z-loss
    is logged on its own when asked for."""
    reference = read_log(workdir / "ep1", "train") if (workdir / "ep1").is_dir() else read_log(
        train(workdir, "ep1", 1, "--gradient_accumulation_steps", "4"), "train")
    off = read_log(train(workdir, "aux_off", 1, "--gradient_accumulation_steps", "4", "--moe_aux_loss_coeff", "0",
                         "--moe_z_loss_coeff", "0.001"), "train")
    assert "moe_load_balancing_loss" not in off[0] and off[0]["moe_z_loss"] > 0
    assert off[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-9)  # the PRM loss itself is the same
    assert off[0]["grad_norm"] != pytest.approx(reference[0]["grad_norm"], rel=1e-6)


@pytest.mark.one_leg
def test_token_classifier_export_scores_like_the_scorer(workdir, tmp_path):
    """``convert-hf export --as token-classifier`` of the trained MoE PRM writes Qwen3MoeForTokenClassification,
    which transformers loads and whose P(good) at every step tag equals ``megatron-prm score``'s."""
    from transformers import AutoModelForTokenClassification

    from megatron_prm.conversion.exporter import export_hf
    from megatron_prm.data.records import validate_record
    from megatron_prm.data.samples import SampleBuilder, SampleOptions
    from megatron_prm.tokenizer import load_tokenizer, special_token_ids

    run = workdir / "ep1" if (workdir / "ep1").is_dir() else train(workdir, "ep1", 1, "--gradient_accumulation_steps", "4")
    records = tmp_path / "records.jsonl"
    records.write_text("".join((workdir / "train.jsonl").read_text().splitlines(keepends=True)[:6]))
    run_cli(["score", "--checkpoint", str(run), "--data", str(records), "--output", str(tmp_path / "scores.jsonl")])
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    summary = export_hf(run, tmp_path / "tc", progress=False, target="token-classifier")
    assert summary["architecture"] == "Qwen3MoeForTokenClassification"

    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "tc", dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3MoeForTokenClassification" and model.config.id2label == {0: "good", 1: "bad"}
    tokenizer = load_tokenizer(MISTRAL)
    builder = SampleBuilder(tokenizer, special_token_ids(tokenizer, "ки", ["+", "-"], add_missing=False),
                            SampleOptions(MAX_SEQ_LEN, 64))
    compared, worst = 0, 0.0
    for index, line in enumerate(records.read_text().splitlines()):
        sample = builder.build(validate_record(json.loads(line), path=records, index=index, line=None,
                                               reward_tokens=("+", "-")))
        with torch.no_grad():
            logits = model(torch.tensor(sample.input_ids[None], dtype=torch.long)).logits[0]
        p_good = torch.softmax(logits[torch.tensor(sample.label_positions, dtype=torch.long)], dim=-1)[:, 0]
        expected = torch.tensor(scored[index]["step_scores"])
        assert p_good.shape == expected.shape and len(expected) > 0, index
        worst = max(worst, (p_good - expected).abs().max().item())
        compared += len(expected)
    assert compared >= 12 and worst <= 1e-4, (compared, worst)
