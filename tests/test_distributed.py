"""Multi-process CPU runs (gloo) of the real training command against a single-process reference."""

import json

import pytest

from conftest import MISTRAL, read_log, run_cli
from megatron_prm.data.synthetic import write_dataset

TINY = {
    "tokenizer_name_or_path": MISTRAL, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_seq_len": 192, "max_prompt_len": 96,
    "device": "cpu", "bf16": False, "learning_rate": 1e-3, "max_steps": 3, "logging_steps": 1,
    "eval_steps": 100, "save_steps": 100, "seed": 7,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_dataset(folder / "train.jsonl", 48, seed=3), write_dataset(folder / "dev.jsonl", 21, seed=4)


def train(tmp_path, data, name, nproc, **overrides):
    output = tmp_path / name
    config = {**TINY, "train_dataset_path": str(data[0]), "dev_dataset_path": str(data[1]),
              "output_dir": str(output), **overrides}
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    result = run_cli(["train", str(tmp_path / f"{name}.json")], nproc=nproc)
    return output, json.loads(result.stdout.strip().splitlines()[-1])


def test_two_data_parallel_ranks_match_one_process(tmp_path, data):
    """One process reads the JSONL; two data-parallel ranks read a preprocessed store of it."""
    single, single_eval = train(tmp_path, data, "dp1", 1, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    store = tmp_path / "store" / "train"
    run_cli(["preprocess", "--data", str(data[0]), "--tokenizer", MISTRAL, "--output-prefix", str(store),
             "--max-seq-len", str(TINY["max_seq_len"]), "--max-prompt-len", str(TINY["max_prompt_len"])])
    double, double_eval = train(tmp_path, (store, data[1]), "dp2", 2, per_device_train_batch_size=4,
                                gradient_accumulation_steps=1, tensorboard_dir=str(tmp_path / "tb"))
    single_steps, double_steps = read_log(single, "train"), read_log(double, "train")
    assert [s["step"] for s in double_steps] == [1, 2, 3]
    for a, b in zip(single_steps, double_steps):
        assert a["labelled_steps"] == b["labelled_steps"] and a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # Evaluation is split over the two ranks and reduced exactly: every dev step counted once.
    assert double_eval["steps"] == single_eval["steps"]
    assert double_eval["records_erroneous"] + double_eval["records_correct"] == 21
    assert double_eval["loss"] == pytest.approx(single_eval["loss"], rel=1e-5)
    assert double_eval["auroc"] == pytest.approx(single_eval["auroc"], abs=1e-6)
    # The run saved its resolved config and a model checkpoint named by `latest`.
    assert json.loads((double / "config.json").read_text())["per_device_train_batch_size"] == 4
    assert (double / "latest").read_text().strip() == "iter_0000003"
    assert (double / "iter_0000003" / "run_config.json").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_evaluation_predictions_are_gathered_on_the_logging_rank_only():
    """Metrics need all predictions in one place, not on every rank: the last rank gets its data-parallel
    group's parts in rank order, the others (and a group without the logging rank) get nothing."""
    from conftest import spawn_ranks
    from eval_gather import gather_on_rank

    assert spawn_ranks(gather_on_rank, 3) == [(0, None), (1, None), (2, ([1, 1, 2, 2, 2], 3.0))]
