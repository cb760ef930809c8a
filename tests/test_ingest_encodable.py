"""Issue #22 class 2: a record counts as valid only when every string it carries into a shard can be
written (UTF-8, as Arrow writes strings); anything that cannot is a per-record reject with its id
and reason, and no single record fails a shard at write time — whatever the validator misses."""
import io
import json
import os

import pyarrow as pa
import pytest
from PIL import Image

from llavadi.schemas.samples import SAMPLE_SCHEMA, iter_samples, write_samples

from conftest import cli, status_json


def conv(image: bool, q: str = "q?", a: str = "a."):
    return [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]


def png() -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(b, format="PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Images whose names are Latin-1 / CP1252 / Shift-JIS bytes (not UTF-8), listed from disk as a
    user's script would, and records carrying unpaired surrogates in each string field."""
    d = tmp_path_factory.mktemp("enc")
    root = d / "img"
    root.mkdir()
    (root / "ok.png").write_bytes(png())
    names = {"latin1": b"caf\xe9.png", "cp1252": b"price\x80.png", "sjis": b"\x93\xfa\x96\x7b.png"}
    for raw in names.values():
        with open(os.path.join(os.fsencode(root), raw), "wb") as f:
            f.write(png())
    listed = {os.fsencode(n): n for n in os.listdir(root)}  # what os.listdir makes of those bytes
    assert listed[b"caf\xe9.png"] == "caf\udce9.png"  # the input
    recs = [{"id": "good-0", "image": "ok.png", "conversations": conv(True)}]
    recs += [{"id": f"name-{k}", "image": listed[raw], "conversations": conv(True)} for k, raw in names.items()]
    recs += [
        {"id": "id-\udce9", "conversations": conv(False)},
        {"id": "turn", "conversations": conv(False, q="x\ud800y")},
        {"id": "answer", "conversations": conv(False, a="\udfff")},
        {"id": "good-1", "conversations": conv(False)},
    ]
    # json.dumps writes each surrogate as a \udXXX escape: valid UTF-8 JSON, as such files occur
    (d / "in.json").write_text(json.dumps(recs))
    (d / "in.jsonl").write_text("\n".join(json.dumps({**r, "id": f"l-{r['id']}"}) for r in recs))
    # an input whose own name is not UTF-8: its records are fine and must not pay for it
    latin_input = os.path.join(os.fsencode(d), b"r\xe9sum\xe9.jsonl")
    with open(latin_input, "w") as f:
        f.write(json.dumps({"id": "from-latin-file", "conversations": conv(False)}) + "\n")
    return d, root, os.fsdecode(latin_input)


def test_unwritable_strings_are_per_record_rejects_and_the_shard_completes(corpus, tmp_path):
    d, root, latin_input = corpus
    run = tmp_path / "run"
    args = ("ingest", run, "--input", d / "in.json", "--input", d / "in.jsonl", "--input", latin_input,
            "--image-root", root, "--shard-size", "4", "--executor", "local")
    p = cli(*args)
    rejects = [json.loads(line) for f in sorted((run / "data" / "rejects").glob("*.jsonl"))
               for line in f.read_text(encoding="utf-8").splitlines()]
    bad = ["name-latin1", "name-cp1252", "name-sjis", "id-\udce9", "turn", "answer"]
    want = sorted(bad + [f"l-{b}" for b in bad])
    assert sorted(r["id"] for r in rejects) == want  # each named by its id (a surrogate one too)
    assert {r["reason"] for r in rejects} == {"not_utf8"}
    by_id = {r["id"]: r for r in rejects}
    assert "image 'caf\\udce9.png'" in by_id["name-latin1"]["detail"] and "b'\\xe9'" in by_id["name-latin1"]["detail"]
    rows = [r for f in sorted((run / "data").glob("part-*.parquet")) for r in iter_samples(f)]
    assert [r["id"] for r in rows] == ["good-0", "good-1", "l-good-0", "l-good-1", "from-latin-file"]
    # the input's non-UTF-8 name is shown with its bytes escaped, by hand: r\xe9sum\xe9.jsonl
    assert rows[-1]["source"] == "r\\xe9sum\\xe9.jsonl:1"
    st = status_json(run)["stages"]["data"]
    assert st["complete"] and st["samples"] == {"in": 17, "out": 5, "rejected": 12}
    assert "(0 run, 5 already done)" in cli(*args).stdout  # a rerun has nothing left to do


def test_a_row_the_validator_let_through_fails_alone_at_write_time(corpus, tmp_path, monkeypatch):
    """The safety net: if validation missed a string (simulated by switching its encodability
    check off), the writer rejects that row as ``unwritable_record`` and writes the others."""
    from llavadi.pipeline.config import load_config
    from llavadi.pipeline.runner import run_stage
    from llavadi.schemas import samples
    from llavadi.stages import ingest

    d, root, _ = corpus
    monkeypatch.setattr(samples, "check_encodable", lambda row: None)
    monkeypatch.setattr(samples, "_check_text", lambda s, where: None)
    run = tmp_path / "run"
    cfg = load_config({}, [f"ingest.inputs=[{d / 'in.json'}]", f"ingest.image_root={root}", "run.executor=local",
                           "ingest.shard_size=100"])
    report = run_stage(ingest.STAGE, run, cfg, progress=False)
    done = json.loads((run / "data" / "_done" / "00000.json").read_text())
    assert done["counts"]["out"] == 2 and done["counts"]["rejected"] == {"unwritable_record": 6}
    rejects = [json.loads(x) for x in (run / "data" / "rejects" / "00000.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejects) == sorted(["name-latin1", "name-cp1252", "name-sjis", "id-\udce9",
                                                         "turn", "answer"])
    assert all("UnicodeEncodeError" in r["detail"] for r in rejects)
    assert [r["id"] for r in iter_samples(run / "data" / "part-00000.parquet")] == ["good-0", "good-1"]
    assert report.shards_run == 1


def test_write_samples_returns_rows_arrow_cannot_encode(tmp_path):
    ok = {"id": "a", "image": None, "conversations": conv(False), "image_sha256": None, "source": "s"}
    rows = [ok, {**ok, "id": "b\udce9"}, {**ok, "id": "c", "conversations": [{"from": "human", "value": 7}]},
            {**ok, "id": "d"}]
    bad = write_samples(rows, tmp_path / "x.parquet")
    assert [r["id"] for r, _ in bad] == ["b\udce9", "c"]
    assert [r["id"] for r in iter_samples(tmp_path / "x.parquet")] == ["a", "d"]
    # every row that comes back is one Arrow refuses on its own (independent check)
    for r, _ in bad:
        with pytest.raises((pa.ArrowException, UnicodeError, TypeError, ValueError)):
            pa.Table.from_pylist([r], schema=SAMPLE_SCHEMA)
