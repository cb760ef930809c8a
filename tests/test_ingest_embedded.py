"""Issue #22 class 7: ingest reads the Hugging Face ``datasets`` Parquet layout — images kept in
the row (``image`` = ``{bytes, path}``, or a binary column) — by writing each image once into the
run's content-addressed store and checking it like a file; and a reject never carries a payload.
Expected values come from the bytes the test embedded (hashlib, Pillow's own decoding)."""
import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llavadi.schemas.images import load_rgb
from llavadi.schemas.samples import iter_samples

from conftest import cli, status_json, tree_bytes

CONV_TYPE = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
# the layout `datasets` writes for an Image feature, with its schema metadata
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_META = {b"huggingface": json.dumps({"info": {"features": {
    "id": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"},
    "conversations": [{"from": {"dtype": "string", "_type": "Value"}, "value": {"dtype": "string", "_type": "Value"}}],
}}}).encode()}


def conv(image: bool):
    return [{"from": "human", "value": ("<image>\n" if image else "") + "What is shown?"},
            {"from": "gpt", "value": "A picture."}]


def encoded(seed: int, fmt: str, size=(48, 40)) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, format=fmt)
    return b.getvalue()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    d = tmp_path_factory.mktemp("hub")
    root = d / "files"
    root.mkdir()
    on_disk = encoded(9, "PNG")
    (root / "on_disk.png").write_bytes(on_disk)
    imgs = {"png_a": encoded(1, "PNG"), "png_b": encoded(2, "PNG"), "jpeg": encoded(3, "JPEG"),
            "big": encoded(4, "PNG", (512, 512))}  # ≈ 0.8 MB of noise
    rows = [
        {"id": "a", "image": {"bytes": imgs["png_a"], "path": "a.png"}, "conversations": conv(True)},
        {"id": "b", "image": {"bytes": imgs["png_b"], "path": None}, "conversations": conv(True)},
        {"id": "a-again", "image": {"bytes": imgs["png_a"], "path": "copy.png"}, "conversations": conv(True)},
        {"id": "jpeg", "image": {"bytes": imgs["jpeg"], "path": "c.jpg"}, "conversations": conv(True)},
        {"id": "big", "image": {"bytes": imgs["big"], "path": "big.png"}, "conversations": conv(True)},
        {"id": "by-path", "image": {"bytes": None, "path": "on_disk.png"}, "conversations": conv(True)},
        {"id": "text", "image": None, "conversations": conv(False)},
        # rejected, each without its payload in the rejects file:
        {"id": "not-an-image", "image": {"bytes": b"\x89PNG\r\n\x1a\n" + bytes(600_000), "path": "x.png"},
         "conversations": conv(True)},
        {"id": "no-token", "image": {"bytes": imgs["big"], "path": "big.png"}, "conversations": conv(False)},
    ]
    schema = pa.schema([("id", pa.string()), ("image", IMAGE_TYPE), ("conversations", CONV_TYPE)], metadata=HF_META)
    f = d / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), f, row_group_size=4)
    # the same images as a plain binary column
    g = d / "binary.parquet"
    pq.write_table(pa.Table.from_pylist(
        [{"id": "bin-jpeg", "image": imgs["jpeg"], "conversations": conv(True)},
         {"id": "bin-b", "image": imgs["png_b"], "conversations": conv(True)}],
        schema=pa.schema([("id", pa.string()), ("image", pa.binary()), ("conversations", CONV_TYPE)])), g)
    return d, root, f, g, imgs, on_disk


def rejects_of(run):
    return [json.loads(x) for p in sorted((run / "data" / "rejects").glob("*.jsonl")) for x in p.read_text().splitlines()]


def test_datasets_parquet_embedded_images_are_stored_once_and_checked_like_files(hub, tmp_path):
    d, root, f, g, imgs, on_disk = hub
    run = tmp_path / "run"
    args = ("ingest", run, "--input", f, "--input", g, "--image-root", root, "--shard-size", "4", "--executor", "local")
    cli(*args)
    rows = {r["id"]: r for p in sorted((run / "data").glob("part-*.parquet")) for r in iter_samples(p)}
    assert sorted(rows) == sorted(["a", "b", "a-again", "jpeg", "big", "by-path", "text", "bin-jpeg", "bin-b"])
    want = {"a": imgs["png_a"], "a-again": imgs["png_a"], "b": imgs["png_b"], "jpeg": imgs["jpeg"],
            "big": imgs["big"], "bin-jpeg": imgs["jpeg"], "bin-b": imgs["png_b"]}
    for rid, data in want.items():
        h = hashlib.sha256(data).hexdigest()
        ext = "jpg" if rid.endswith("jpeg") else "png"
        assert rows[rid]["image"] == f"run:data/images/{h[:2]}/{h}.{ext}" and rows[rid]["image_sha256"] == h
        stored = run / "data" / "images" / h[:2] / f"{h}.{ext}"
        assert stored.read_bytes() == data
        # a later stage sees the pixels Pillow decodes from the embedded bytes
        assert np.array_equal(np.asarray(load_rgb(None, rows[rid]["image"], run)),
                              np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    # one file per distinct content (a and a-again share one; the jpeg and png_b came twice),
    # plus the stored bytes of the rejected non-image
    stored = sorted(p.name for p in (run / "data" / "images").rglob("*") if p.is_file())
    assert len(stored) == 5
    assert rows["by-path"]["image"] == "on_disk.png"
    assert rows["by-path"]["image_sha256"] == hashlib.sha256(on_disk).hexdigest()
    assert rows["text"]["image"] is None
    rej = {r["id"]: r for r in rejects_of(run)}
    assert {k: v["reason"] for k, v in rej.items()} == {"not-an-image": "undecodable_image",
                                                          "no-token": "image_token_mismatch"}
    st = status_json(run)["stages"]["data"]
    assert st["complete"] and st["samples"] == {"in": 11, "out": 9, "rejected": 2}
    before = tree_bytes(run / "data")
    assert "(0 run, 3 already done)" in cli(*args).stdout
    assert tree_bytes(run / "data") == before


def test_embedded_only_input_needs_no_image_root_and_a_damaged_store_file_is_caught(hub, tmp_path):
    d, root, f, g, imgs, _ = hub
    run = tmp_path / "run"
    cli("ingest", run, "--input", g, "--executor", "local", "--shard-size", "1")
    rows = [r for p in sorted((run / "data").glob("part-*.parquet")) for r in iter_samples(p)]
    assert [r["id"] for r in rows] == ["bin-jpeg", "bin-b"]
    # the store is checked by hash like a file: damage one image, drop its shard's marker, rerun
    h = hashlib.sha256(imgs["png_b"]).hexdigest()
    victim = run / "data" / "images" / h[:2] / f"{h}.png"
    victim.write_bytes(victim.read_bytes()[:-10])
    (run / "data" / "_done" / "00001.json").unlink()
    cli("ingest", run, "--input", g, "--executor", "local", "--shard-size", "1")
    assert victim.read_bytes() == imgs["png_b"]  # rewritten from the input, not trusted
    assert [r["id"] for r in iter_samples(run / "data" / "part-00001.parquet")] == ["bin-b"]
    # a record naming the store itself is checked the same way (the hash is in the name)
    rec = {"id": "forged", "image": f"run:data/images/{h[:2]}/{'0' * 64}.png", "conversations": conv(True)}
    (d / "forged.json").write_text(json.dumps([rec]))
    run2 = tmp_path / "run2"
    cli("ingest", run2, "--input", d / "forged.json", "--image-root", root, "--executor", "local")
    assert [r["reason"] for r in rejects_of(run2)] == ["bad_image_field"]


def test_a_reject_never_carries_a_payload(hub, tmp_path):
    d, root, f, g, imgs, _ = hub
    big_id = "i" * 3_000_000
    recs = [
        {"id": big_id, "conversations": [{"from": "gpt", "value": "wrong role"}, {"from": "human", "value": "x"}]},
        {"id": "list-image", "image": list(range(500_000)), "conversations": conv(True)},
        {"id": "long-path", "image": "p/" * 1_000_000 + "x.png", "conversations": conv(True)},
        {"id": "dup", "conversations": conv(False)},
        {"id": "dup", "conversations": conv(False)},
        {"id": "object-image", "image": {"bytes": "A" * 2_000_000}, "conversations": conv(True)},
    ]
    (d / "long.json").write_text(json.dumps(recs))
    run = tmp_path / "run"
    cli("ingest", run, "--input", d / "long.json", "--input", f, "--image-root", root, "--executor", "local")
    lines = [x for p in sorted((run / "data" / "rejects").glob("*.jsonl")) for x in p.read_bytes().splitlines()]
    rej = {json.loads(x)["id"][:20]: json.loads(x) for x in lines}
    assert len(lines) == 7 and max(len(x) for x in lines) < 2500, [len(x) for x in lines]
    # the inputs carry > 10 MB between them; the rejects name records, they do not hold them
    assert sum(len(x) for x in lines) < 12_000
    assert rej["i" * 20]["id"].endswith("[cut: 3000000 chars]") and rej["i" * 20]["reason"] == "bad_roles"
    assert "[cut: list of 500000 items]" in rej["list-image"]["detail"]
    assert "[cut: 2000005 chars]" in rej["long-path"]["detail"]
    assert "[cut: 2000000 chars]" in rej["object-image"]["detail"]
    assert rej["not-an-image"]["reason"] == "undecodable_image"


def test_a_later_stage_reads_stored_images(hub, tmp_path, tiny_teacher):
    """cache-teacher (HF engine, in-process) opens the stored images through the same resolver:
    every embedded-image sample is cached, none rejected."""
    from llavadi.pipeline.config import load_config
    from llavadi.pipeline.runner import run_stage
    from llavadi.schemas.teacher_cache import CacheReader
    from llavadi.stages import cache_teacher, ingest

    d, root, f, g, imgs, _ = hub
    run = tmp_path / "run"
    cfg = load_config({}, [f"ingest.inputs=[{g}]", "run.executor=local", f"teacher.model={tiny_teacher}",
                           "cache_teacher.engine=hf", "cache_teacher.source=data", "cache_teacher.top_k=4"])
    run_stage(ingest.STAGE, run, cfg, progress=False)
    run_stage(cache_teacher.STAGE, run, cfg, progress=False)
    done = json.loads((run / "cache_teacher" / "_done" / "00000.json").read_text())
    assert done["counts"]["out"] == 2 and not done["counts"]["rejected"]
    ids = [s["sample_id"] for e in CacheReader(run / "cache_teacher").shards
           for s in CacheReader(run / "cache_teacher").iter_shard(e)]
    assert ids == ["bin-jpeg", "bin-b"]


def test_eval_checks_a_cache_samples_stored_image_in_the_cache_run(hub, tmp_path):
    """The check every later stage makes of a sample's image (``schemas.samples.sample_image``: eval --cache,
    train-student, cache-teacher) resolves store references in the sample's run, with no image root, and
    still catches a changed image."""
    from llavadi.schemas.samples import Reject, sample_image

    def reason(run_dir):
        try:
            sample_image(None, row, run_dir=run_dir, decode=False)
        except Reject as r:
            return r.reason
        return None

    d, root, f, g, imgs, _ = hub
    run = tmp_path / "run"
    cli("ingest", run, "--input", g, "--executor", "local")
    row = next(iter_samples(run / "data" / "part-00000.parquet"))
    assert reason(run) is None
    assert reason(tmp_path / "elsewhere") == "missing_image"
    stored = run / row["image"][len("run:"):]
    stored.write_bytes(imgs["png_b"])  # other bytes under this name
    assert reason(run) == "missing_image"