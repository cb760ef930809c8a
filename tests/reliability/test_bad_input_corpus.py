"""A seeded corpus of bad inputs mixed among good records: each bad record is rejected with the
reason the table below expects (written by hand, not taken from the code), every good record is
kept, in input order, and the run is the same whatever the position of the bad records."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import cli, status_json  # noqa: E402

from llavadi.schemas.samples import iter_samples  # noqa: E402

pytestmark = pytest.mark.reliability

IMG = "images/train/000000.png"


def conv(q="<image>\nWhat colour is the square?", a="red"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def rec(rid, **kw):
    r = {"id": rid, "image": IMG, "conversations": conv()}
    r.update(kw)
    return {k: v for k, v in r.items() if v is not ...}


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# id -> (JSONL line, expected reason)
BAD = {
    "truncated": (b'{"id": "truncated", "conversations": [{"from": "hum\n', "malformed_json"),
    "trailing-garbage": (b'{"id": "trailing-garbage"} xx\n', "malformed_json"),
    "deep": (b'{"id": "deep", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n", "malformed_json"),
    "latin1": ('{"id": "latin1-\xe9", "conversations": []}\n'.encode("latin-1"), "not_utf8"),
    "surrogate": (b'{"id": "surrogate", "conversations": [{"from": "human", "value": "q \\ud800"}, '
                  b'{"from": "gpt", "value": "a"}]}\n', "not_utf8"),
    "array": (b'[1, 2, 3]\n', "not_an_object"),
    "string": (b'"just a string"\n', "not_an_object"),
    "no-id": (line(rec(None, id=...)), "missing_id"),
    "bool-id": (line(rec(True)), "missing_id"),
    "dup": (line(rec("good-0000")), "duplicate_id"),
    "conv-str": (line(rec("conv-str", conversations="USER: hi ASSISTANT: hello")), "bad_conversations"),
    "conv-missing-value": (line(rec("conv-missing-value", conversations=[{"from": "human"}])), "bad_conversations"),
    "gpt-first": (line(rec("gpt-first", conversations=conv()[::-1])), "bad_roles"),
    "system-role": (line(rec("system-role", conversations=[{"from": "system", "value": "<image>\nbe nice"},
                                                         {"from": "gpt", "value": "ok"}])), "bad_roles"),
    "two-humans": (line(rec("two-humans", conversations=[conv()[0], conv()[0], conv()[1]])), "bad_roles"),
    "no-answer": (line(rec("no-answer", conversations=conv()[:1])), "bad_roles"),
    "blank-answer": (line(rec("blank-answer", conversations=conv(a=" \n\t "))), "empty_turn"),
    "two-image-tokens": (line(rec("two-image-tokens", conversations=conv(q="<image>\n<image>\nq"))),
                         "image_token_mismatch"),
    "token-no-image": (line(rec("token-no-image", image=...)), "image_token_mismatch"),
    "image-int": (line(rec("image-int", image=7)), "bad_image_field"),
    "image-absolute": (line(rec("image-absolute", image="/etc/passwd")), "bad_image_field"),
    "image-escape": (line(rec("image-escape", image="../../../../etc/hostname")), "bad_image_field"),
    "image-missing": (line(rec("image-missing", image="images/none.png")), "missing_image"),
    "image-dir": (line(rec("image-dir", image="images")), "missing_image"),
    "image-empty-file": (line(rec("image-empty-file", image="bad/empty.png")), "undecodable_image"),
    "image-truncated": (line(rec("image-truncated", image="bad/truncated.png")), "undecodable_image"),
    "image-text": (line(rec("image-text", image="bad/text.png")), "undecodable_image"),
    "huge": (line(rec("huge", conversations=conv(a="x" * 3_000_000))), "too_long"),
}


def good(i: int) -> bytes:
    if i % 3 == 0:  # text-only, multi-turn
        c = conv("How many shapes?", str(i % 7)) + conv("And now?", "none")
        return line({"id": f"good-{i:04d}", "conversations": c})
    return line(rec(f"good-{i:04d}", conversations=conv(a=f"answer {i}")))


def corpus(seed: int, n_good: int = 150) -> tuple[bytes, list[str]]:
    rng = random.Random(seed)
    goods = [good(i) for i in range(n_good)]
    # good-0000 first, so that "dup" is always the duplicate; the bad lines land anywhere after it
    lines = [goods[0]] + goods[1:]
    for key in sorted(BAD):
        lines.insert(rng.randrange(1, len(lines) + 1), BAD[key][0])
    return b"".join(lines), [f"good-{i:04d}" for i in range(n_good)]


@pytest.fixture(scope="module")
def images(synth, tmp_path_factory):
    _, root = synth
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes((root / IMG).read_bytes()[:60])
    (bad / "text.png").write_text("not an image at all")
    return root


@pytest.mark.parametrize("seed", [1, 2])
def test_every_bad_record_rejected_with_its_reason_and_nothing_else_lost(images, tmp_path, seed):
    data, good_ids = corpus(seed)
    f = tmp_path / "corpus.jsonl"
    f.write_bytes(data)
    run = tmp_path / "run"
    p = cli("ingest", run, "--input", f, "--image-root", images, "--shard-size", "16", "--executor", "local",
            "ingest.max_chars=100000", timeout=600)
    assert f"rejected {len(BAD)}" in p.stdout, p.stdout

    rows = [r for s in sorted((run / "data").glob("part-*.parquet")) for r in iter_samples(s)]
    assert [r["id"] for r in rows] == good_ids  # all kept, in input order

    rejects = [json.loads(x) for s in sorted((run / "data" / "rejects").glob("*.jsonl"))
               for x in s.read_text().splitlines()]
    assert len(rejects) == len(BAD)
    # match each reject to its corpus line by the line number in its source ("corpus.jsonl:N")
    lines = data.split(b"\n")
    by_key = {}
    for r in rejects:
        n = int(r["source"].rsplit(":", 1)[1])
        key = next(k for k, (raw, _) in BAD.items() if raw.rstrip(b"\n") == lines[n - 1])
        by_key[key] = r
        assert r["detail"], r
    assert {k: r["reason"] for k, r in by_key.items()} == {k: reason for k, (_, reason) in BAD.items()}
    st = status_json(run)["stages"]["data"]
    assert st["samples"] == {"in": len(good_ids) + len(BAD), "out": len(good_ids), "rejected": len(BAD)}
    assert sum(st["rejected_by_reason"].values()) == len(BAD)
