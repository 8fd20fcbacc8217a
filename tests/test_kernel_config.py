"""--kernel-config: overrides of the Triton kernels' launch parameters, checked when the flag is
read, applied to every platform's KernelConfig in the process, and named in the startup line;
and the decode split count they steer."""
from __future__ import annotations

import pytest

import hal
from backends.triton.decode_attention import splits_for_batch
from engine.server_args import ServerArgs
from hal.kernel_config import KernelConfig, overrides, set_overrides


@pytest.fixture(autouse=True)
def no_overrides():
    set_overrides({})
    yield
    set_overrides({})


@pytest.mark.parametrize("text, message", [
    ('{"decode_blok_n": 32}', "unknown kernel config field 'decode_blok_n'; the fields are: warp_size"),
    ('{"decode_block_n": 48}', "decode_block_n must be a power of two >= 16, got 48"),
    ('{"max_kv_splits": "16"}', "max_kv_splits must be an integer, got '16'"),
    ('{"min_split_tokens": true}', "min_split_tokens must be an integer, got True"),
    ('[64]', "must be a JSON object"),
    ("min_split_tokens=64", "is not JSON"),
])
def test_bad_overrides_are_clear_errors(text, message):
    with pytest.raises(ValueError, match="--kernel-config .*" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        ServerArgs(model_path="m", kernel_config=text)


def test_overrides_reach_every_platform_config():
    cpu = hal.get_platform("cpu")
    default = cpu.kernel_config()
    set_overrides({"min_split_tokens": 128, "balance_splits": 4})
    cfg = cpu.kernel_config()
    assert (cfg.min_split_tokens, cfg.balance_splits) == (128, 4)
    assert cfg.decode_block_n == default.decode_block_n and cfg.num_compute_units == default.num_compute_units
    set_overrides({})
    assert cpu.kernel_config() == default


def test_model_runner_sets_and_names_the_overrides(llama_tiny):
    from engine.runner.model_runner import ModelRunner

    runner = ModelRunner(ServerArgs(model_path=str(llama_tiny), device="cpu", max_total_tokens=256,
                                    kernel_config='{"elementwise_num_warps": 2}'))
    assert overrides() == {"elementwise_num_warps": 2}
    assert runner.describe().endswith('kernel_config={"elementwise_num_warps": 2}')
    runner = ModelRunner(ServerArgs(model_path=str(llama_tiny), device="cpu", max_total_tokens=256))
    assert overrides() == {} and "kernel_config" not in runner.describe()


def test_decode_splits_two_programs_per_unit_and_the_balance_minimum():
    cfg = KernelConfig(num_compute_units=132)               # 8 KV heads below
    assert [splits_for_batch(b, 8, cfg) for b in (1, 8, 16, 17, 33, 64, 256)] == [16, 8, 4, 2, 1, 1, 1]
    balanced = KernelConfig(num_compute_units=132, balance_splits=4)
    # at least 4 while batch x 8 <= 8 x 132, i.e. up to 132 requests
    assert [splits_for_batch(b, 8, balanced) for b in (1, 8, 33, 64, 132, 133, 512)] == [16, 8, 4, 4, 4, 1, 1]
