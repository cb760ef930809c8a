"""Docs that cannot drift from the code (issue #13, fault class 6).

- The README's config-key and CLI-option listings are exactly what ``pipeline/config_doc.py``
  generates from the config dataclasses and the typer app (``make docs`` rewrites them).
- Every ``section.key`` the README or a preset names exists; every README default is the
  dataclass default.
- Every ``llavadi CMD … --flag`` written in the README, the presets' launch instructions and
  the code's docstrings/messages is accepted by that command.
- The stage commands share one set of common options, and each works on each command.
- File names the docs give are the ones the code writes (``part-NNNNN``, not ``shard-NNNNN``).

All in-process (typer's CliRunner; ``--dry-run`` stops before any stage imports torch).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from llavadi import cli
from llavadi.pipeline import config_doc
from llavadi.pipeline.config import ConfigError, load_config, load_yaml
from llavadi.pipeline.rundir import STAGE_COMMAND, StageDir

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
STAGES = ["ingest", "regenerate", "cache-teacher", "train-student", "eval", "on-policy"]
COMMON_OPTS = ["--config", "--executor", "--ray-address", "--force", "--dry-run"]
STALE = "README.md is stale: run `make docs` (python -m llavadi.pipeline.config_doc) and commit the result"


def _group():
    return typer.main.get_command(cli.app)


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])
            if o.startswith("-")}


# ----------------------------------------------------------------------------- generated blocks
def test_config_key_block_is_generated_from_the_dataclasses():
    assert config_doc.read_block(README.read_text(), config_doc.CONFIG_BLOCK) == config_doc.config_reference(), STALE


def test_cli_option_block_is_generated_from_the_commands():
    assert config_doc.read_block(README.read_text(), config_doc.CLI_BLOCK) == config_doc.cli_reference_from_app(), STALE


def _readme_defaults() -> dict[str, str]:
    """key → default as the README's config-key block shows it (``| `key` | type | `default` | …``)."""
    block = config_doc.read_block(README.read_text(), config_doc.CONFIG_BLOCK)
    return {m[1]: m[2] for m in re.finditer(r"^\| `([a-z_.]+)` \|[^|]*(?:\\\|[^|]*)*\| `([^`]*)` \|", block, re.M)}


def test_readme_lists_every_key_with_the_dataclass_default():
    shown = _readme_defaults()
    keys = config_doc.config_keys()
    assert sorted(set(keys) - set(shown)) == [], STALE
    assert sorted(set(shown) - set(keys)) == [], STALE
    wrong = {k: (shown[k], config_doc._yaml(v)) for k, v in keys.items() if shown[k] != config_doc._yaml(v)}
    assert not wrong, f"README default vs code default: {wrong}; {STALE}"
    # and each shown default means the same value to the config loader
    for k, text in shown.items():
        assert yaml.safe_load(text) == keys[k], k


def test_generator_rewrites_a_stale_block_and_check_mode_fails(tmp_path):
    text = README.read_text()
    for name, body in config_doc.generated_blocks().items():  # independent of whether README is current
        text = config_doc.replace_block(text, name, body)
    stale = text.replace("| `train_student.kd.chunk_size` | int | `512` |", "| `train_student.kd.chunk_size` | int | `1024` |")
    assert stale != text
    path = tmp_path / "README.md"
    path.write_text(stale)
    assert config_doc.main(["--check", str(path)]) == 1
    assert path.read_text() == stale  # --check writes nothing
    assert config_doc.main([str(path)]) == 0
    assert path.read_text() == text
    assert config_doc.main(["--check", str(path)]) == 0


def test_a_new_config_key_shows_up_in_the_listing():
    import dataclasses

    from llavadi.pipeline.config import EvalConfig, LlavadiConfig

    @dataclasses.dataclass
    class Eval2(EvalConfig):
        new_knob: int = 3  # what the new knob does

    Root = dataclasses.make_dataclass("Root", [("eval", Eval2, dataclasses.field(default_factory=Eval2))])
    out = config_doc.config_reference(Root)
    assert "| `eval.new_knob` | int | `3` | what the new knob does |" in out
    assert re.search(r"^\| `eval.engine` \|.*\| `hf` \| \S", out, re.M)  # inherited: comment from the parent
    assert {"eval.new_knob", "eval.engine"} <= set(config_doc.config_keys(Root))
    assert "eval.new_knob" not in config_doc.config_keys(LlavadiConfig)


# ----------------------------------------------------------------------------- key names in prose
_SECTIONS = {p.split(".")[-1] for p, _ in config_doc.sections()}


def _key_mentions(text: str) -> set[str]:
    """Backticked ``a.b[.c][=value]`` spans whose first part is a config section name."""
    out = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        m = re.fullmatch(r"([a-z_]+(?:\.[a-z_]+)+)(?:=.*)?", span.strip())
        if m and m[1].split(".")[0] in _SECTIONS:
            out.add(m[1])
    return out


def test_every_config_key_the_readme_names_exists():
    keys = set(config_doc.config_keys())
    paths = keys | {p for p, _ in config_doc.sections()}
    suffixes = {k.split(".", i)[-1] for k in paths for i in range(k.count(".") + 1)}
    unknown = []
    for key in sorted(_key_mentions(README.read_text())):
        top = key.split(".")[0] in {p for p, _ in config_doc.sections() if "." not in p}
        if (key not in paths) if top else (key not in suffixes):  # `kd.exact` inside the train-student section
            unknown.append(key)
    assert not unknown, f"README names config keys that do not exist: {unknown}"


def test_every_config_key_the_code_names_in_strings_and_comments_exists():
    """Messages ("run `llavadi cache-teacher` with cache_teacher.source=data"), docstrings and
    comments name keys too; a renamed key must not leave them behind."""
    import io
    import tokenize

    paths = set(config_doc.config_keys()) | {p for p, _ in config_doc.sections()}
    suffixes = {k.split(".", i)[-1] for k in paths for i in range(k.count(".") + 1)}
    tops = {p for p, _ in config_doc.sections() if "." not in p}
    pat = re.compile(r"(?<![\w./-])((?:%s)(?:\.[a-z_]+)+\*?)(?![\w(])" % "|".join(sorted(_SECTIONS)))
    unknown, seen = [], 0
    for py in _python_sources():
        for tok in tokenize.generate_tokens(io.StringIO(py.read_text()).readline):
            if tok.type not in (tokenize.STRING, tokenize.COMMENT):
                continue
            for key in pat.findall(re.sub(r"\{[^{}]*\}", "", tok.string)):  # not f-string expressions
                if key.endswith((".py", ".json", ".jsonl", ".yaml", ".parquet")):
                    continue
                seen += 1
                if key.endswith("*"):  # a family of keys: `train_student.freeze_*`
                    if not any(p.startswith(key[:-1]) for p in paths):
                        unknown.append(f"{py.relative_to(REPO)}:{tok.start[0]}: {key}")
                elif (key not in paths) if key.split(".")[0] in tops else (key not in suffixes):
                    unknown.append(f"{py.relative_to(REPO)}:{tok.start[0]}: {key}")
    assert seen > 50  # the scan finds the keys that messages and comments name
    assert not unknown, "config keys named in the code that do not exist:\n" + "\n".join(unknown)


def _python_sources() -> list[Path]:
    return sorted(REPO.glob("*.py")) + sorted(p for d in ("pipeline", "stages", "schemas", "benchmarks")
                                              for p in (REPO / d).rglob("*.py"))


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_use_existing_keys(preset):
    try:
        load_config(load_yaml(str(preset)))
    except ConfigError as e:
        pytest.fail(f"{preset.name}: {e}")


# ----------------------------------------------------------------------------- commands in the docs
def _code_texts() -> list[tuple[str, str]]:
    """(where, text) for every code span and code-block line of the README, every comment line of
    the presets and every backticked span of the package's Python sources (docstrings, messages),
    with ``\\`` continuation lines joined."""
    out = []
    readme = README.read_text()
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", readme, re.S | re.M)
    for block in fenced:
        out += [("README code block", line) for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", readme, flags=re.S | re.M)
    out += [("README", s) for s in re.findall(r"`([^`\n]+)`", prose)]
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        comments = "\n".join(line.lstrip("#") for line in preset.read_text().splitlines() if line.startswith("#"))
        out += [(preset.name, line) for line in comments.replace("\\\n", " ").splitlines()]
    for py in _python_sources():
        out += [(py.relative_to(REPO).as_posix(), s) for s in re.findall(r"``?([^`\n]+)``?", py.read_text())]
    return out


def _invocations() -> list[tuple[str, str, list[str]]]:
    """(where, command, [--flags]) for every ``llavadi CMD …`` / ``-m llavadi.cli CMD …`` found."""
    found = []
    for where, text in _code_texts():
        for m in re.finditer(r"(?:(?<![\w./-])llavadi|-m llavadi\.cli)\s+([a-z][a-z-]*)([^#]*)", text):
            rest = re.split(r"\s(?:&&|;|\|\s)", m[2])[0]
            found.append((where, m[1], re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest)))
    return found


def test_docs_mention_commands_with_flags():
    inv = _invocations()
    assert {c for _, c, _ in inv} >= set(STAGES) | {"status", "demo"}
    assert any(c == "train-student" and "--student" in f for _, c, f in inv)  # the parser finds flags


def test_every_command_and_option_the_docs_use_exists():
    group = _group()
    bad = []
    for where, cmd, flags in _invocations():
        if cmd not in group.commands:
            bad.append(f"{where}: `llavadi {cmd}` is not a command")
            continue
        known = _options(group.commands[cmd]) | {"--help"}
        bad += [f"{where}: `llavadi {cmd}` has no option {f}" for f in flags if f not in known]
    assert not bad, "\n".join(sorted(set(bad)))


def test_help_of_every_command_runs_in_process():
    runner = CliRunner()
    for cmd in _group().commands:
        r = runner.invoke(cli.app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, (cmd, r.output)
        if cmd in STAGES:
            for opt in COMMON_OPTS:
                assert opt in r.output, (cmd, opt)


# ----------------------------------------------------------------------------- one set of common options
def test_stage_commands_share_one_set_of_common_options():
    group = _group()
    assert cli.STAGE_COMMANDS == STAGES
    assert set(STAGE_COMMAND.values()) == set(STAGES)  # the run directory's stages are these commands
    decls = {}
    for name in STAGES:
        params = {p.name: p for p in group.commands[name].params}
        for common in cli.COMMON_NAMES:
            p = params[common]
            decls.setdefault(common, (p.param_type_name, tuple(p.opts), p.nargs, p.default))
            assert (p.param_type_name, tuple(p.opts), p.nargs, p.default) == decls[common], (name, common)
        # RUN and the overrides are the command's positional arguments, in that order
        assert [p.name for p in group.commands[name].params if p.param_type_name == "argument"] == ["run", "overrides"]
    assert sorted(o for opts in (d[1] for d in decls.values()) for o in opts if o.startswith("--")) == sorted(COMMON_OPTS)


def _write_config(tmp_path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: {num_workers: 3}\n")
    return cfg


@pytest.mark.parametrize("cmd", STAGES)
def test_common_options_take_effect_on_every_stage_command(cmd, tmp_path):
    run = tmp_path / "run"
    args = [cmd, str(run), "--config", str(_write_config(tmp_path)), "--executor", "local",
            "--ray-address", "10.0.0.1:6379", "--force", "--dry-run", "run.max_retries=5"]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    printed = yaml.safe_load(r.stdout)
    assert printed["run"] == {**printed["run"], "executor": "local", "ray_address": "10.0.0.1:6379",
                              "num_workers": 3, "max_retries": 5}
    assert not run.exists()  # --dry-run wrote nothing (--force deleted nothing)


@pytest.mark.parametrize("cmd", STAGES)
def test_bad_executor_is_refused_by_every_stage_command(cmd, tmp_path):
    r = CliRunner().invoke(cli.app, [cmd, str(tmp_path / "run"), "--executor", "spark", "--dry-run"])
    assert r.exit_code == 2 and "spark" in r.output


def test_where_a_common_option_cannot_apply_help_says_what_it_does():
    group = _group()
    for cmd in ("train-student", "eval"):
        params = {p.name: p for p in group.commands[cmd].params}
        for name in ("executor", "ray_address", "force"):
            assert params[name].help == cli.NOTES[cmd][name]
            assert params[name].help != {p.name: p for p in group.commands["ingest"].params}[name].help
    assert "runs in this process" in {p.name: p for p in group.commands["train-student"].params}["executor"].help


def test_engine_option_help_follows_the_config_choices():
    group = _group()
    for cmd, key in (("regenerate", "regenerate.engine"), ("cache-teacher", "cache_teacher.engine"),
                     ("eval", "eval.engine")):
        (p,) = [p for p in group.commands[cmd].params if p.name == "engine"]
        default = config_doc.config_keys()[key]
        assert p.help.startswith(f"{key}: ") and f"{default} (default)" in p.help


# ----------------------------------------------------------------------------- file names
def test_teacher_cache_shard_names_are_the_run_directory_names(tmp_path):
    from llavadi.schemas import teacher_cache
    from llavadi.schemas.teacher_cache import CacheSpec

    for store, ext in (("zarr", "zarr"), ("webdataset", "tar")):
        spec = CacheSpec(hidden_size=8, top_k=2, store=store)
        assert spec.shard_name(7) == StageDir(tmp_path, "cache_teacher", ext).data_file(7).name == f"part-00007.{ext}"
    assert "shard-NNNNN" not in teacher_cache.__doc__ and "shard-0" not in teacher_cache.__doc__
    assert "part-NNNNN.zarr" in teacher_cache.__doc__ and "part-NNNNN.tar" in teacher_cache.__doc__


def test_readme_run_directory_names_are_the_code_names(tmp_path):
    text = README.read_text()
    sd = StageDir(tmp_path, "data")
    for path in (sd.data_file(0), sd.done_file(0), sd.rejects_file(0), sd.stats_file(0)):
        assert path.relative_to(sd.path).as_posix() in text, path
    assert not re.search(r"shard-(?:N{5}|\d{5})", text)
