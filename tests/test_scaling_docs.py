"""README "Scaling up" and ``docs/slurm_llavadi.sh`` against the code (issue #15 item 6): the worked
cache sizes are the estimator's bytes per token, and every command, option and config key the Slurm
script uses exists."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SLURM = REPO / "docs" / "slurm_llavadi.sh"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Scaling up")
    return text[start:text.index("\n## ", start + 1)]


def test_worked_cache_sizes_are_the_estimators():
    from llavadi.schemas.teacher_cache import CacheSpec

    tokens = 665_000 * 150
    rows = re.findall(r"^\| (\w+) / (\w+)(?: \(the preset\))? \| ([\d ]+) \| ([\d.]+) (TB|GB) \|", _section(), re.M)
    assert len(rows) == 6
    for hd, ld, bpt, size, unit in rows:
        spec = CacheSpec(hidden_size=5120, vocab_size=32064, top_k=64, hidden_dtype=hd, logprob_dtype=ld)
        b = sum(spec.bytes_per_row().values())
        assert int(bpt.replace(" ", "")) == b, (hd, ld)
        shown = float(size) * (1e12 if unit == "TB" else 1e9)
        assert abs(shown - tokens * b) <= 0.0006 * tokens * b, (hd, ld, shown, tokens * b)
    # the preset's dtypes are the row marked as the preset's
    import yaml

    preset = yaml.safe_load((REPO / "configs" / "llava13b_to_mobilellama2.7b.yaml").read_text())["cache_teacher"]
    assert f"| {preset['hidden_dtype']} / {preset['logprob_dtype']} (the preset) |" in _section()


def test_slurm_script_parses_and_uses_existing_commands_options_and_keys():
    import typer.main

    from llavadi import cli
    from llavadi.pipeline import config_doc

    assert subprocess.run(["bash", "-n", str(SLURM)]).returncode == 0
    code = "\n".join(line for line in SLURM.read_text().splitlines() if not line.lstrip().startswith("#"))
    text = code.replace("\\\n", " ")  # commands, not the header's prose
    group = typer.main.get_command(cli.app)
    keys = set(config_doc.config_keys())
    arrays = dict(re.findall(r"^(\w+)=\((.*)\)$", text, re.M))  # RAY=(…), ENGINES=(…)
    calls = re.findall(r"(?:^|\s)(?:llavadi|-m llavadi\.cli)\s+([a-z-]+)(.*)$", text, re.M)
    assert {c for c, _ in calls} == {"ingest", "regenerate", "cache-teacher", "status", "train-student"}
    seen_keys = set()
    for cmd, rest in calls:
        rest = rest.split("#")[0]
        for name, body in arrays.items():
            rest = rest.replace(f'"${{{name}[@]}}"', body)
        words = shlex.split(rest)
        options = {o for p in group.commands[cmd].params for o in getattr(p, "opts", []) if o.startswith("-")}
        assert {w for w in words if w.startswith("-")} <= options, (cmd, words)
        for w in words:
            if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=.*", w):
                seen_keys.add(w.split("=")[0])
    assert seen_keys and seen_keys <= keys, seen_keys - keys
    assert "--nnodes" in text and "ray start --head" in text and "--dry-run" in text and "ray stop" in text


@pytest.mark.parametrize("key", ["train_student.gradient_checkpointing", "train_student.lora.enabled",
                                 "train_student.micro_batch_size", "teacher.tensor_parallel_size"])
def test_scaling_section_names_the_knobs(key):
    assert f"`{key}" in _section()
