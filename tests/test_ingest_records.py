"""Each class of bad record is rejected with its reason, counted in ``status --json``, and
nothing else is lost. Inputs mix a JSON list, JSONL and Parquet."""
import json
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llavadi.schemas.samples import REASONS, iter_samples

from conftest import cli, status_json

IMG = "images/train/000000.png"


def good(i, image=True, turns=1):
    conv = []
    for t in range(turns):
        conv += [{"from": "human", "value": ("<image>\n" if image and t == 0 else "") + f"question {i}.{t}?"},
                 {"from": "gpt", "value": f"answer {i}.{t}"}]
    r = {"id": f"good-{i}", "conversations": conv}
    if image:
        r["image"] = IMG
    return r


# reason -> a record (dict for the JSON list) or raw JSONL bytes
BAD_JSON = {
    "not_an_object": 42,
    "missing_id": {"image": IMG, "conversations": good(0)["conversations"]},
    "duplicate_id": {**good(1), "id": "good-0"},  # good-0 comes first in the JSON list
    "bad_conversations": {"id": "bc", "conversations": "USER: hi"},
    "bad_roles": {"id": "br", "image": IMG, "conversations": [{"from": "gpt", "value": "<image>\nhi"},
                                                               {"from": "human", "value": "x"}]},
    "empty_turn": {"id": "et", "image": IMG, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                               {"from": "gpt", "value": "  "}]},
    "image_token_mismatch": {"id": "itm", "image": IMG, "conversations": [{"from": "human", "value": "no token"},
                                                                          {"from": "gpt", "value": "a"}]},
    "bad_image_field": {"id": "bif", "image": 17, "conversations": good(2)["conversations"]},
    "missing_image": {"id": "mi", "image": "images/nope.png", "conversations": good(3)["conversations"]},
    "undecodable_image": {"id": "ui", "image": "broken.png", "conversations": good(4)["conversations"]},
    "too_long": {"id": "tl", "conversations": [{"from": "human", "value": "x" * 5000}, {"from": "gpt", "value": "y"}]},
}
BAD_JSONL = {
    "malformed_json": b'{"id": "mj", "conversations": [\n',
    "not_utf8": b'{"id": "nu\xff\xfe", "conversations": []}\n',
}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, synth):
    _, root = synth
    tmp = tmp_path_factory.mktemp("bad")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    goods = [good(0), good(10, image=False), good(11, turns=3)]
    js = tmp / "list.json"
    js.write_text(json.dumps(goods + list(BAD_JSON.values())))
    jl = tmp / "lines.jsonl"
    jl.write_bytes(b"".join([json.dumps(good(20)).encode() + b"\n", b"\n", *BAD_JSONL.values(),
                             json.dumps(good(21, image=False)).encode() + b"\n"]))
    pqf = tmp / "table.parquet"
    pq.write_table(pa.Table.from_pylist([good(30), good(31, turns=2)]), pqf)
    run = tmp / "run"
    p = cli("ingest", run, "--input", js, "--input", jl, "--input", pqf, "--image-root", root,
            "--shard-size", "5", "--executor", "local", "ingest.max_chars=4000")
    assert "rejected 13" in p.stdout, p.stdout
    rejects = [json.loads(l) for f in sorted((run / "data" / "rejects").glob("*.jsonl")) for l in f.read_text().splitlines()]
    rows = [r for f in sorted((run / "data").glob("part-*.parquet")) for r in iter_samples(f)]
    return run, rejects, rows, status_json(run)


@pytest.mark.parametrize("reason", sorted(list(BAD_JSON) + list(BAD_JSONL)))
def test_bad_record_is_rejected_with_reason_and_counted(ingested, reason):
    _, rejects, rows, st = ingested
    assert reason in REASONS
    mine = [r for r in rejects if r["reason"] == reason]
    assert len(mine) == 1, (reason, rejects)
    assert mine[0]["detail"] and mine[0]["source"]
    assert st["stages"]["data"]["rejected_by_reason"][reason] == 1


def test_good_records_all_kept_in_input_order(ingested):
    _, rejects, rows, st = ingested
    ids = [r["id"] for r in rows]
    assert ids == ["good-0", "good-10", "good-11", "good-20", "good-21", "good-30", "good-31"]
    s = st["stages"]["data"]
    assert s["samples"] == {"in": 20, "out": 7, "rejected": 13}
    assert s["complete"] and s["shards_done"] == s["shards_total"] == 4
    by_id = {r["id"]: r for r in rows}
    assert by_id["good-10"]["image"] is None and by_id["good-10"]["image_sha256"] is None
    assert len(by_id["good-11"]["conversations"]) == 6
    assert by_id["good-0"]["source"] == "list.json#0" and by_id["good-20"]["source"] == "lines.jsonl:1"


def test_image_sha256_is_of_the_file(ingested, synth):
    import hashlib

    _, root = synth
    _, _, rows, _ = ingested
    want = hashlib.sha256((root / IMG).read_bytes()).hexdigest()
    assert {r["image_sha256"] for r in rows if r["image"]} == {want}


def test_json_list_broken_midway_rejects_rest_and_keeps_earlier(tmp_path, synth):
    _, root = synth
    f = tmp_path / "cut.json"
    f.write_text(json.dumps([good(0), good(1)])[:-30])  # truncated inside the 2nd record
    run = tmp_path / "run"
    cli("ingest", run, "--input", f, "--image-root", root, "--executor", "local")
    st = status_json(run)["stages"]["data"]
    # issue #13: the cut record and whatever may have followed it (the list is not closed) are
    # each counted
    assert st["samples"]["out"] == 1 and st["rejected_by_reason"] == {"unreadable_json": 2}


def test_stage_level_problems_stop_before_work(tmp_path, synth):
    _, root = synth
    notlist = tmp_path / "obj.json"
    notlist.write_text('{"id": 1}')
    p = cli("ingest", tmp_path / "run", "--input", notlist, "--input", tmp_path / "missing.jsonl",
            "--image-root", tmp_path / "nodir", "--executor", "local", check=False)
    assert p.returncode == 2
    assert "is not a JSON list" in p.stderr and "missing.jsonl does not exist" in p.stderr
    assert "is not a directory" in p.stderr
    assert not (tmp_path / "run" / "data").exists()
