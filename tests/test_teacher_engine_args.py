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


SEEDED = """
import json, sys
from llavadi.models.engines.generate import GenRequest, VLLMEngine
from llavadi.pipeline.config import SamplingConfig, TeacherConfig

eng = VLLMEngine(TeacherConfig(model=sys.argv[1], max_model_len=512))
s = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4, min_new_tokens=0, stop=[])
reqs = [GenRequest(" ".join(["a circle"] * (10 + i % 20)), None, seed=i) for i in range(300)]
print("RESULT " + json.dumps([[r.token_ids for r in eng.generate(reqs, s)] for _ in range(2)]))
"""


@pytest.mark.vllm
def test_seeded_sampling_on_cpu_takes_more_prompt_tokens_than_one_step(tiny_teacher):
    """vLLM 0.32's CPU runner fails a step that ends inside a seeded request's prompt (chunked prefill: "CPU
    Generator does not use offset"), which the on-policy rounds hit at 300 prompts: llavadi's CPU engine samples 300
    seeded requests (~8 000 prompt tokens, two steps' worth) and twice gives the same tokens. Subprocess: vLLM's CPU
    backend pins the threads of the process that loads it."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", SEEDED, str(tiny_teacher)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    first, second = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert len(first) == 300 and all(first) and first == second
