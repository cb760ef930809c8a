"""Shared fixtures: tiny models and synthetic data built on the fly (no network), CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: ~5 s init, not ~33 s
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cli(*args: str, env: dict | None = None, check: bool = True, cwd: str | None = None, timeout: float = 300):
    """Run ``python -m llavadi.cli ARGS`` in a subprocess; returns CompletedProcess."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "llavadi.cli", *map(str, args)], capture_output=True, text=True,
                       env=e, cwd=cwd, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"llavadi {' '.join(map(str, args))} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def vllm_greedy(model_dir: Path, items: list[dict], max_tokens: int, tmp_path: Path) -> list[list[int]]:
    """Greedy token ids from vLLM for ``items`` (``{"prompt", "image"}``), in a subprocess
    (``vllm_greedy_script.py``: vLLM's CPU backend pins the threads of the process that loads it)."""
    pf = tmp_path / "vllm_prompts.json"
    pf.write_text(json.dumps(items))
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_greedy_script.py")), str(model_dir), str(pf),
                        str(max_tokens)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):])


def status_json(run: Path) -> dict:
    return json.loads(cli("status", run, "--json").stdout)


def tree_bytes(stage_dir: Path) -> dict[str, bytes]:
    """Every output file of a stage (data, rejects, done markers) by relative path; excludes
    per-run timing stats, the lock and scratch files."""
    out = {}
    for p in sorted(stage_dir.rglob("*")):
        rel = p.relative_to(stage_dir).as_posix()
        if p.is_file() and not rel.startswith(("stats/", "_staging/")) and rel != "_lock.json":
            out[rel] = p.read_bytes()
    return out


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> tuple[Path, Path]:
    """(train.json, image_root): 120 synthetic conversations, single/multi-turn and text-only."""
    from llavadi.stages.demo.synthetic_vqa import generate

    root = tmp_path_factory.mktemp("synth")
    return generate(root, 120, seed=3), root


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    from llavadi.stages.demo.tiny_models import TEACHER, build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "teacher", TEACHER)


@pytest.fixture(scope="session")
def cached_run(tmp_path_factory, tiny_teacher) -> tuple[Path, Path, Path]:
    """(run, student, image_root): 24 synthetic samples ingested (3 shards) and cached by the tiny
    teacher (top-k 8, source=data), plus an untrained tiny student. Tests copy the run dir."""
    from llavadi.stages.demo.synthetic_vqa import generate
    from llavadi.stages.demo.tiny_models import STUDENT, build_tiny_llava

    root = tmp_path_factory.mktemp("cached")
    train = generate(root, 24, seed=11)
    run = root / "base"
    cli("ingest", run, "--input", train, "--image-root", root, "--shard-size", "8", "--executor", "local")
    cli("cache-teacher", run, "--teacher", tiny_teacher, "--executor", "local", "cache_teacher.source=data",
        "cache_teacher.top_k=8")
    return run, build_tiny_llava(root / "student", STUDENT), root


def kill_when(args: list, cond, timeout: float = 300, env: dict | None = None) -> int:
    """Start ``python -m llavadi.cli ARGS`` in its own session, SIGKILL the whole process group as
    soon as ``cond()`` holds, and return the exit status (``-SIGKILL`` when killed)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "llavadi.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **(env or {})})
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if cond():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    return proc.wait()
