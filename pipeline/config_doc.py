"""The README's reference listings, generated from the code so they cannot drift from it.

Two marked blocks of ``README.md`` are rewritten here (``make docs`` =
``python -m llavadi.pipeline.config_doc``; ``--check`` only compares, exit 1 when stale):

- ``config-keys``: every key of :class:`~llavadi.pipeline.config.LlavadiConfig`, one table per
  section (nested dataclasses are their own sections), with its type or choices (``Literal``),
  its default as ``--dry-run`` prints it (YAML), and its meaning = the comment next to / above the
  field in ``pipeline/config.py`` (the section line is the class docstring). A key added to the
  config appears here with no other step than regenerating.
- ``cli-options``: the options every stage command shares (``cli.COMMON``), what a common option
  means on a command where it cannot apply (its per-command help), and each command's own options,
  read from the click commands typer builds — the same source ``--help`` prints.

``tests/test_docs.py`` fails when either block differs from what this module produces.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml

from .config import LlavadiConfig

README = Path(__file__).resolve().parent.parent / "README.md"
CONFIG_BLOCK = "config-keys"
CLI_BLOCK = "cli-options"


# ------------------------------------------------------------------------------ config keys
def _comments(cls: type) -> dict[str, str]:
    """Field name → its comment in the source of the class that declares it: the ``#`` lines
    directly above the field (no blank line between), then the comment on its own line(s)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_comments(klass))
    return out


def _own_comments(cls: type) -> dict[str, str]:
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, i = [], node.lineno - 1
        while i >= 1 and lines[i - 1].strip().startswith("#"):
            above.insert(0, by_line.get(i, ""))
            i -= 1
        own = [by_line[j] for j in range(node.lineno, (node.end_lineno or node.lineno) + 1) if j in by_line]
        out[node.target.id] = " ".join(t for t in above + own if t)
    return out


def _doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):  # dataclass's generated signature, not a docstring
        return ""
    return " ".join(doc.split())


def _type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_type(a) for a in inner)
        return text + " or null" if len(inner) < len(args) else text
    if origin is Literal:
        return ", ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("...") else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def sections(cls: type = LlavadiConfig, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted section, dataclass) depth first: a section, then the sections nested in it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            path = f"{prefix}{f.name}"
            yield path, tp
            yield from sections(tp, path + ".")


def config_keys(cls: type = LlavadiConfig) -> dict[str, Any]:
    """Every leaf key (dotted) → its default."""
    out: dict[str, Any] = {}
    for path, sec in sections(cls):
        default = sec()
        for f in dataclasses.fields(sec):
            if not dataclasses.is_dataclass(typing.get_type_hints(sec)[f.name]):
                out[f"{path}.{f.name}"] = getattr(default, f.name)
    return out


def config_reference(cls: type = LlavadiConfig) -> str:
    """Markdown: one table per config section (key, type / choices, default, meaning)."""
    parts = []
    for path, sec in sections(cls):
        hints, comments, default = typing.get_type_hints(sec), _comments(sec), sec()
        doc = _doc(sec)
        rows = [f"| `{path}.{f.name}` | {_cell(_type(hints[f.name]))} | `{_cell(_yaml(getattr(default, f.name)))}` "
                f"| {_cell(comments.get(f.name, ''))} |"
                for f in dataclasses.fields(sec) if not dataclasses.is_dataclass(hints[f.name])]
        parts.append("\n".join([f"`{path}`" + (f": {doc}" if doc else ""), "",
                                "| key | type / choices | default | meaning |", "|---|---|---|---|", *rows]))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------ CLI options
def _decl(param) -> str:
    """``--config``, ``-c FILE`` / ``RUN`` as written on a command line."""
    if param.param_type_name == "argument":
        return f"`{param.metavar or param.name.upper()}`"
    meta = "" if param.is_flag else " " + (param.metavar or "VALUE")
    names = sorted(param.opts, key=lambda o: (not o.startswith("--"), o))
    return ", ".join(f"`{n}{meta if i == len(names) - 1 else ''}`" for i, n in enumerate(names))


def _help(param) -> str:
    return _cell(" ".join((getattr(param, "help", None) or "").split()))


def _params(cmd) -> list:
    return [p for p in cmd.params if not getattr(p, "hidden", False) and p.name != "help"]


def cli_reference(group, stage_commands: list[str], common: list[str]) -> str:
    """Markdown: the common options of ``stage_commands`` (help as most of them print it), the
    commands where a common option's help differs, and every command's own options."""
    cmds = group.commands
    out = [f"Common to every stage command ({', '.join(f'`{c}`' for c in stage_commands)}):", "",
           "| argument / option | meaning |", "|---|---|"]
    notes = []
    for name in common:
        helps = [(c, next(p for p in cmds[c].params if p.name == name)) for c in stage_commands]
        texts = [_help(p) for _, p in helps]
        usual = max(texts, key=texts.count)
        out.append(f"| {_decl(helps[0][1])} | {usual} |")
        notes += [f"| `{c}` | {_decl(p)} | {_help(p)} |" for c, p in helps if _help(p) != usual]
    notes.sort(key=lambda row: stage_commands.index(row.split("`")[1]))  # by command, stable
    if notes:
        out += ["", "Where a common option cannot apply, the command accepts it and its `--help` says what it "
                    "does there:", "", "| command | option | there |", "|---|---|---|", *notes]
    out += ["", "Each command's own arguments and options:", "", "| command | argument / option | meaning |",
            "|---|---|---|"]
    for name, cmd in cmds.items():
        own = [p for p in _params(cmd) if name not in stage_commands or p.name not in common]
        out += [f"| `{name}` | {_decl(p)} | {_help(p)} |" for p in own]
        if not own:
            out.append(f"| `{name}` | | (only the common ones) |")
    return "\n".join(out) + "\n"


def cli_reference_from_app() -> str:
    """The listing of the ``llavadi`` typer app (imported here only: docs look at the CLI, the
    pipeline never does)."""
    import typer.main

    from .. import cli

    return cli_reference(typer.main.get_command(cli.app), list(cli.STAGE_COMMANDS), list(cli.COMMON_NAMES))


# ------------------------------------------------------------------------------ README blocks
def _block_re(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name}:begin[^>]*-->\n)(.*?)(<!-- {name}:end -->)", re.S)


def read_block(text: str, name: str) -> str:
    m = _block_re(name).search(text)
    if not m:
        raise ValueError(f"README has no <!-- {name}:begin --> … <!-- {name}:end --> block")
    return m.group(2)


def replace_block(text: str, name: str, body: str) -> str:
    read_block(text, name)  # raises when missing
    return _block_re(name).sub(lambda m: m.group(1) + body + m.group(3), text, count=1)


CACHE_BLOCK = "cache-fields"


def cache_fields_reference() -> str:
    """The README's teacher-cache field table, from the declarations (``schemas.teacher_cache.format_table``)."""
    from ..schemas.teacher_cache import format_table

    return format_table() + "\n"


def generated_blocks() -> dict[str, str]:
    return {CONFIG_BLOCK: config_reference(), CLI_BLOCK: cli_reference_from_app(), CACHE_BLOCK: cache_fields_reference()}


def main(argv: list[str] | None = None) -> int:
    """``python -m llavadi.pipeline.config_doc [--check] [README.md]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    path = Path(args[0]) if args else README
    text = path.read_text()
    new = text
    for name, body in generated_blocks().items():
        new = replace_block(new, name, body)
    if new == text:
        print(f"{path}: reference blocks up to date")
        return 0
    if check:
        import difflib

        sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(path),
                                                   f"{path} (generated)"))
        print(f"{path}: reference blocks are stale; run `make docs`", file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"{path}: reference blocks rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
