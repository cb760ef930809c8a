"""The vLLM engine arguments llavadi derives from ``teacher.*`` (no engine is started here; the
real engines run in test_regenerate / test_cache_teacher)."""
import pytest

from llavadi.models.engines import common as te
from llavadi.pipeline.config import ConfigError, TeacherConfig, load_config


def test_cpu_defaults_eager_prefix_cache_in_32_token_blocks(tiny_teacher):
    kw = te.vllm_engine_kwargs(TeacherConfig(model=str(tiny_teacher)), on_gpu=False)
    assert kw["enforce_eager"] is True
    assert kw["enable_prefix_caching"] is True and kw["block_size"] == 32
    assert kw["dtype"] == "float32" and "gpu_memory_utilization" not in kw


def test_explicit_settings_win_and_gpu_keeps_vllm_defaults(tiny_teacher):
    t = TeacherConfig(model=str(tiny_teacher), enforce_eager=False, prefix_caching=False, kv_block_size=64)
    kw = te.vllm_engine_kwargs(t, on_gpu=False)
    assert (kw["enforce_eager"], kw["enable_prefix_caching"], kw["block_size"]) == (False, False, 64)
    g = te.vllm_engine_kwargs(TeacherConfig(model=str(tiny_teacher), gpu_memory_utilization=0.5), on_gpu=True)
    # on GPU: vLLM chooses compilation/CUDA graphs and the block size itself
    assert "enforce_eager" not in g and "block_size" not in g
    assert g["gpu_memory_utilization"] == 0.5 and g["dtype"] == "bfloat16"


@pytest.mark.parametrize("bad", [0, 8, 40])
def test_kv_block_size_is_checked_before_work(bad):
    with pytest.raises(ConfigError) as e:
        load_config({}, [f"teacher.kv_block_size={bad}"])
    assert "teacher.kv_block_size must be a multiple of 16" in str(e.value)
