"""Parallel layouts are checked before anything starts; recompute settings really recompute."""

import pytest
import torch

from megatron_prm.config import ConfigError, build_config
from megatron_prm.layout import resolve_layout
from megatron_prm.model.architecture import Architecture
from megatron_prm.model.provider import padded_vocab_size

ARCH = Architecture(num_hidden_layers=6, hidden_size=64, intermediate_size=192, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=8, vocab_size=32000, max_position_embeddings=128,
                         rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02)


def layout(world, **arguments):
    return resolve_layout(build_config(arguments), world, ARCH)


def test_data_parallel_size_is_derived():
    resolved, notes = layout(8, tensor_parallel_degree=2, pipeline_parallel_degree=2, sharding="stage1")
    assert (resolved.data_parallel_size, resolved.distributed_optimizer, notes) == (2, True, [])


@pytest.mark.parametrize("world, arguments, message", [
    (6, {"tensor_parallel_degree": 4}, "world size 6 is not divisible by tensor_parallel_degree 4 x pipeline_parallel_degree 1 = 4"),
    (4, {"pipeline_parallel_degree": 4}, "num_hidden_layers 6 is not divisible by pipeline_parallel_degree 4 x virtual_pp_degree 1 = 4"),
    (4, {"pipeline_parallel_degree": 2, "virtual_pp_degree": 2}, "num_hidden_layers 6 is not divisible by pipeline_parallel_degree 2 x virtual_pp_degree 2"),
    (4, {"tensor_parallel_degree": 4}, "num_key_value_heads (query groups) 2 is not divisible by tensor_parallel_degree 4"),
    (2, {"pipeline_parallel_degree": 2, "virtual_pp_degree": 3, "gradient_accumulation_steps": 3},
     "gradient_accumulation_steps (3) to be a multiple of pipeline_parallel_degree 2"),
    (4, {"sharding": "stage1", "sharding_parallel_degree": 2, "tensor_parallel_degree": 1}, "sharding_parallel_degree 2 must be -1 or the data-parallel size 4"),
])
def test_impossible_layouts_name_the_clashing_numbers(world, arguments, message):
    with pytest.raises(ConfigError) as err:
        layout(world, **arguments)
    assert message in str(err.value)


def test_sequence_parallel_without_tensor_parallelism_is_switched_off_with_a_note():
    resolved, notes = layout(2, sequence_parallel=True)
    assert not resolved.sequence_parallel and "tensor_parallel_degree > 1" in notes[0]


def test_unsupported_sharding_and_recompute_values():
    with pytest.raises(ConfigError, match="stage3"):
        build_config({"sharding": "stage3"})
    with pytest.raises(ConfigError, match="recompute_granularity"):
        build_config({"recompute_granularity": "everything"})


def test_reward_rows_of_the_parallel_tests_sit_on_different_tensor_parallel_ranks():
    rows_per_rank = padded_vocab_size(32000, 2) // 2
    assert 648 < rows_per_rank <= 20000  # "+" on rank 0, "Device" on rank 1 (tests/test_parallel.py)


@pytest.fixture(scope="module")
def runtime():
    from megatron_prm.runtime import init_runtime, shutdown
    from megatron_prm.layout import ParallelLayout

    yield init_runtime("cpu", seed=0, layout=ParallelLayout())
    shutdown()


@pytest.mark.parametrize("granularity, module_path, forwards", [
    ("full", "decoder.layers.0", 2),
    ("core_attn", "decoder.layers.0.self_attention.core_attention", 2),
    ("full_attn", "decoder.layers.0.self_attention.linear_qkv", 2),
    (None, "decoder.layers.0", 1),
])
def test_recompute_runs_the_module_again_in_backward_with_the_same_gradients(runtime, granularity, module_path, forwards):
    from megatron_prm.model.provider import ModelBuildOptions, Recompute, build_model_chunks

    def model_with(recompute):
        torch.manual_seed(0)
        options = ModelBuildOptions(use_cpu_initialization=True, recompute=recompute)
        return build_model_chunks(ARCH, (648, 387), 64, options)[0]

    plain = model_with(None)
    model = model_with(Recompute(granularity, "uniform", 1) if granularity else None)
    model.load_state_dict(plain.state_dict())
    calls = []
    model.get_submodule(module_path).register_forward_hook(lambda *args: calls.append(1))
    tokens = torch.randint(0, 32000, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    index = torch.tensor([[0, 5], [1, 15]])
    for net in (plain, model):
        net(tokens, positions, None, reward_index=index).sum().backward()
    assert len(calls) == forwards
    for (name, a), b in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-8, msg=name)
