"""Checkpoint reads confined and consistent (issue 27): storage paths in ``.metadata`` stay inside the checkpoint,
tensor chunks tile their declared sizes, the model config's tied flag agrees with the stored weights, a train
state of the wrong type is refused; each as one line, with the manifest recomputed as an attacker would."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pickle
import shutil

import pytest
import torch

from conftest import REPO
from megatron_prm.checkpoint import TrainState, read_train_state
from megatron_prm.checkpoint_manifest import write_manifest
from megatron_prm.run_directory import CheckpointError
from megatron_prm.safe_loading import SafeFileSystemReader, load_metadata


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny untied Llama imported to a Megatron checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_prm.conversion.importer import import_hf

    root = tmp_path_factory.mktemp("consistency")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(root / "hf")
    import_hf(root / "hf", root / "megatron", progress=False)
    return root / "megatron"


@pytest.fixture
def checkpoint(imported, tmp_path):
    target = tmp_path / "megatron"
    shutil.copytree(imported, target)
    return target


def rewrite_metadata(checkpoint, change) -> None:
    """Apply ``change`` to the checkpoint's metadata and reseal the manifest."""
    metadata = load_metadata(checkpoint / ".metadata")
    change(metadata)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    write_manifest(checkpoint)


def export(checkpoint, out, capsys) -> tuple[int, str]:
    spec = importlib.util.spec_from_file_location("convert_hf_tool", REPO / "tools" / "convert_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(["--no-progress", "export", "--megatron", str(checkpoint), "--out", str(out)])
    return code, capsys.readouterr().err


def assert_one_line(code, err, *fragments):
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_the_untouched_checkpoint_exports(checkpoint, tmp_path, capsys):
    code, err = export(checkpoint, tmp_path / "hf", capsys)
    assert code == 0, err


@pytest.mark.parametrize("where", ["../other/__0_0.distcp", "/etc/hostname", "sub/../../x.distcp", "..\\x.distcp"])
def test_storage_paths_stay_inside_the_checkpoint(checkpoint, tmp_path, capsys, where):
    def redirect(metadata):
        index = next(iter(metadata.storage_data))
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path=where)

    rewrite_metadata(checkpoint, redirect)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory|leads out of"):
        SafeFileSystemReader(checkpoint).read_metadata()
    assert_one_line(*export(checkpoint, tmp_path / "hf", capsys), str(checkpoint), "refused")
    assert not (tmp_path / "hf").exists()


def test_a_storage_file_that_links_out_is_refused(checkpoint, tmp_path):
    name = next(iter(load_metadata(checkpoint / ".metadata").storage_data.values())).relative_path
    outside = tmp_path / "outside.distcp"
    shutil.move(checkpoint / name, outside)
    (checkpoint / name).symlink_to(outside)
    with pytest.raises(CheckpointError, match="leads out of the checkpoint directory"):
        SafeFileSystemReader(checkpoint).read_metadata()


def test_an_embedding_shape_that_contradicts_its_chunks_is_refused(checkpoint, tmp_path, capsys):
    def grow(metadata):
        item = metadata.state_dict_metadata["embedding.word_embeddings.weight"]
        rows, columns = item.size
        metadata.state_dict_metadata["embedding.word_embeddings.weight"] = dataclasses.replace(
            item, size=torch.Size([rows * 2, columns]))

    rewrite_metadata(checkpoint, grow)
    with pytest.raises(CheckpointError, match="embedding.word_embeddings.weight has size .* but its chunks hold"):
        SafeFileSystemReader(checkpoint).read_metadata()
    assert_one_line(*export(checkpoint, tmp_path / "hf", capsys), "contradicts the stored chunks")


def test_a_chunk_outside_its_size_is_refused(checkpoint):
    def shift(metadata):
        item = metadata.state_dict_metadata["output_layer.weight"]
        chunk = item.chunks[0]
        item.chunks[0] = dataclasses.replace(chunk, offsets=torch.Size([1, 0]))

    rewrite_metadata(checkpoint, shift)
    with pytest.raises(CheckpointError, match="output_layer.weight: a chunk at \\[1, 0\\]"):
        SafeFileSystemReader(checkpoint).read_metadata()


def test_a_tied_config_over_untied_weights_is_refused(checkpoint, tmp_path, capsys):
    config = json.loads((checkpoint / "model_config.json").read_text())
    (checkpoint / "model_config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    write_manifest(checkpoint)
    assert_one_line(*export(checkpoint, tmp_path / "hf", capsys), "tie_word_embeddings true",
                    "separate output_layer.weight")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("state,message", [
    ([1, 2], "is a list, not a mapping"),
    ({"step": "6"}, "field 'step' is '6', not a count"),
    ({"step": -1}, "field 'step' is -1"),
    ({"step": True}, "field 'step' is True"),
    ({"layout": []}, "field 'layout' is [], not a mapping"),
    ({"run_id": 7}, "field 'run_id' is 7"),
])
def test_a_train_state_of_the_wrong_type_is_refused(tmp_path, state, message):
    with pytest.raises(CheckpointError, match=message.replace("[", "\\[").replace("]", "\\]")):
        TrainState.from_dict(state, "common.pt train_state")
    (tmp_path / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="train_state.json"):
        read_train_state(tmp_path)
    assert TrainState.from_dict({"step": 6, "best_metric": None}).step == 6


@pytest.mark.parametrize("step_tag,reward_tokens,message", [("", None, "placeholder_token must not be empty"),
                                                            (" ", None, "placeholder_token must not be empty"),
                                                            (None, "", "reward_tokens must name two")])
def test_export_refuses_an_empty_step_tag_instead_of_using_the_default(imported, step_tag, reward_tokens, message):
    from megatron_prm.config import ConfigError
    from megatron_prm.conversion.exporter import step_tokens

    with pytest.raises(ConfigError, match=message):
        step_tokens(imported, step_tag, reward_tokens)
