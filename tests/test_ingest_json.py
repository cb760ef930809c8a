"""Issue #13, class 1: ingest reads any valid JSON (integers of any size, long floats, nesting up
to the documented 500 levels) the same in a ``.json`` list and in ``.jsonl``; a broken stretch of
a ``.json`` list costs only the records it spans, and every lost record is a counted reject.

Expected values are written by hand: which records survive, their ids, and the reject count of
each broken file follow from the README's rule, not from the reader's output."""
from __future__ import annotations

import io
import json

import pytest

from llavadi.pipeline.config import load_config
from llavadi.pipeline.runner import run_stage
from llavadi.schemas.samples import REASONS, iter_samples
from llavadi.stages.ingest import IngestStage
from llavadi.stages.ingest_reader import _JsonList


def conv(i: int) -> str:
    return (f'[{{"from": "human", "value": "question {i}?"}}, '
            f'{{"from": "gpt", "value": "answer {i}"}}]')


def record(i: int, extra: str = "", rid: str | None = None) -> str:
    """Record i as JSON text (hand-built, so it can hold numbers Python's json.dumps cannot write)."""
    return '{"id": ' + (rid or f'"r{i:02d}"') + ', "conversations": ' + conv(i) + extra + "}"


# numbers a JSON parser must read whatever their size or precision (record index -> extra fields)
HARD = {
    3: ', "meta": {"phash": 18446744073709551615}',                      # 2**64 - 1 (the issue's record)
    5: ', "score": 1e-400',                                              # underflows a double
    7: ', "x": 1234567890123456789012345678901234567890.123456789',      # 40 digits before the point
    9: ', "big": ' + "9" * 5000,                                         # past Python's 4300-digit int() limit
    11: ', "neg": -18446744073709551616, "inf": 1e400',                 # -(2**64); overflows a double
    13: ', "meta": {"deep": ' + "[" * 498 + "]" * 498 + "}",           # record depth exactly 500 (record, meta, 498 lists)
}
IDS = [f"r{i:02d}" for i in range(20)]


def text_records(n=20) -> list[str]:
    return [record(i, HARD.get(i, "")) for i in range(n)]


def ingest(tmp_path, name: str, data: bytes, shard_size: int = 7):
    f = tmp_path / name
    f.write_bytes(data)
    run = tmp_path / ("run-" + name)
    cfg = load_config(None, [f"ingest.inputs={json.dumps([str(f)])}", f"ingest.image_root={json.dumps(str(tmp_path))}",
                             f"ingest.shard_size={shard_size}", "run.executor=local"])
    rep = run_stage(IngestStage(), run, cfg, progress=False)
    rows = [r for p in sorted((run / "data").glob("part-*.parquet")) for r in iter_samples(p)]
    rejects = [json.loads(x) for p in sorted((run / "data" / "rejects").glob("*.jsonl")) for x in p.read_text().splitlines()]
    return rep.counts, rows, rejects


def items(data: bytes) -> list[dict]:
    return list(_JsonList(io.BytesIO(data), "t.json").items())


def test_issue_13_a_64_bit_hash_loses_nothing_and_json_equals_jsonl(tmp_path):
    recs = text_records()
    c_json, rows_json, rej_json = ingest(tmp_path, "list.json", ("[\n" + ",\n".join(recs) + "\n]").encode())
    c_jsonl, rows_jsonl, rej_jsonl = ingest(tmp_path, "lines.jsonl", "\n".join(recs).encode() + b"\n")
    for counts, rows, rejects in ((c_json, rows_json, rej_json), (c_jsonl, rows_jsonl, rej_jsonl)):
        assert counts["in"] == 20 and counts["out"] == 20 and counts["rejected"] == {}, (counts, rejects)
        assert [r["id"] for r in rows] == IDS
        assert rows[4]["conversations"] == [{"from": "human", "value": "question 4?"}, {"from": "gpt", "value": "answer 4"}]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "source"} for r in rows]  # noqa: E731
    assert strip(rows_json) == strip(rows_jsonl)
    assert rows_json[3]["source"] == "list.json#3" and rows_jsonl[3]["source"] == "lines.jsonl:4"


def test_integer_ids_of_any_size_are_kept_exactly(tmp_path):
    recs = [record(0, rid="18446744073709551615"), record(1, rid="-7"), record(2, rid='"s"')]
    for name, data in (("a.json", ("[" + ",".join(recs) + "]").encode()), ("a.jsonl", "\n".join(recs).encode())):
        _, rows, _ = ingest(tmp_path, name, data)
        assert [r["id"] for r in rows] == ["18446744073709551615", "-7", "s"]


def test_nesting_limit_is_the_same_in_json_and_jsonl(tmp_path):
    ok = record(0, ', "m": ' + "[" * 499 + "]" * 499)        # depth 1 (the record) + 499 = 500
    deep = record(1, ', "m": ' + "[" * 500 + "]" * 500)      # 501
    very = record(2, ', "m": ' + "[" * 100_000 + "]" * 100_000)
    recs = [ok, deep, very, record(3)]
    for name, data in (("d.json", ("[" + ",".join(recs) + "]").encode()), ("d.jsonl", "\n".join(recs).encode())):
        counts, rows, rejects = ingest(tmp_path, name, data)
        assert [r["id"] for r in rows] == ["r00", "r03"], name
        assert counts["rejected"] == {"malformed_json": 2}, name
        assert all("500" in r["detail"] for r in rejects), rejects


def breakages() -> dict[str, tuple[list[str], dict[int, str]]]:
    """name -> (the 20 record texts with some broken, {index: expected reason})."""
    out = {}
    r = text_records()
    r[4] = record(4)[:40]                                  # truncated mid-record: an unclosed '[' and '{'
    r[9] = record(9).replace('"}]', '"}}', 1)              # '}' closes the conversations '['
    r[14] = record(14).replace('"answer 14"', '"answer 14', 1)  # unterminated string: quotes flip
    out["unbalanced"] = (r, {4: "unreadable_json", 9: "unreadable_json", 14: "unreadable_json"})
    r = text_records()
    r[2] = record(2, ', "x": tru')                          # balanced, bad literal
    r[6] = record(6).replace("question", "qu\xe9stion")    # written below as latin-1: not UTF-8
    r[8] = "42"                                            # a record that is not an object
    out["balanced"] = (r, {2: "malformed_json", 6: "not_utf8", 8: "not_an_object"})
    return out


@pytest.mark.parametrize("sep", [",", ",\n  "], ids=["compact", "indented"])
@pytest.mark.parametrize("case", ["unbalanced", "balanced"])
def test_a_broken_stretch_costs_only_its_records(sep, case, capsys):
    recs, bad = breakages()[case]
    data = ("[" + sep.join(recs) + "]").encode("utf-8")
    if case == "balanced":
        data = data.replace("qu\xe9stion".encode(), "qu\xe9stion".encode("latin-1"))
    got = items(data)
    ok = [x["record"]["id"] for x in got if "record" in x and isinstance(x["record"], dict)]
    assert ok == [IDS[i] for i in range(20) if i not in bad]
    rejected = {x["source"]: x.get("reject") for x in got if "reject" in x}
    rejected.update({x["source"]: "not_an_object" for x in got if "record" in x and not isinstance(x["record"], dict)})
    assert rejected == {f"t.json#{i}": reason for i, reason in bad.items()}
    assert all(x["detail"] for x in got if "reject" in x)
    err = capsys.readouterr().err
    assert ("WARNING" in err) == (case == "unbalanced")  # lost boundaries are reported loudly


def test_a_truncated_file_counts_the_cut_record_and_the_unknowable_tail(tmp_path):
    full = ("[" + ",".join(text_records()) + "]").encode()
    cut = full[:full.index(b'"r10"') + 20]  # the file stops inside record 10
    counts, rows, rejects = ingest(tmp_path, "cut.json", cut)
    assert [r["id"] for r in rows] == IDS[:10]
    # record 10 (its start is in the file) + one for whatever followed it
    assert counts == {"in": 12, "out": 10, "rejected": {"unreadable_json": 2}}
    assert {r["source"] for r in rejects} == {"cut.json#10", "cut.json#11"}
    assert all("without the list's closing ']'" in r["detail"] for r in rejects)
    # cut exactly after a record and its comma: nothing of a record is visible, the tail still counts
    at_boundary = full[:full.index(b'{"id": "r10"')]
    got = items(at_boundary)
    assert [x["record"]["id"] for x in got if "record" in x] == IDS[:10]
    assert [x["reject"] for x in got if "reject" in x] == ["unreadable_json"]


def test_tolerated_syntax_loses_and_adds_nothing():
    a, b = record(0), record(1)
    for data in ("[" + a + "," + b + ",]", "[" + a + " " + b + "]", "\ufeff[" + a + "," + b + "]", " [ " + a + "," + b + " ] \n"):
        got = items(data.encode())
        assert [x["record"]["id"] for x in got] == ["r00", "r01"], data[:20]
    assert items(b"[]") == [] and items(b" [\n] ") == []


def test_a_record_longer_than_the_limit_costs_itself_only(monkeypatch):
    from llavadi.stages import ingest_reader as mod

    monkeypatch.setattr(mod, "MAX_RECORD_BYTES", 4096)
    monkeypatch.setattr(mod, "_CHUNK", 512)  # exercise refills and string tokens cut at a chunk's end
    recs = text_records(6)
    recs[2] = record(2, ', "blob": "' + 'x\\"y' * 2000 + '"')
    got = items(("[" + ",".join(recs) + "]").encode())
    assert [x["record"]["id"] for x in got if "record" in x] == ["r00", "r01", "r03", "r04", "r05"]
    assert [(x["source"], x["reject"]) for x in got if "reject" in x] == [("t.json#2", "unreadable_json")]


def test_reject_reasons_are_documented():
    readme = (__import__("pathlib").Path(__file__).resolve().parents[1] / "README.md").read_text()
    for reason in ("unreadable_json", "unsupported_image"):
        assert reason in REASONS and f"`{reason}`" in readme
    assert "500 levels" in readme
