"""Teacher cache contract (design §5, issue #20): round trips per field and codec, Zarr ≡ WebDataset,
determinism, crash safety, corruption detection, id packing, the image-row store and old versions."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llavadi.pipeline import atomic
from llavadi.schemas.teacher_cache import (
    HIDDEN_DTYPES, LOGPROB_DTYPES, SCHEMA_VERSION, CacheCorruptError, CacheReader, CacheShardWriter, CacheSpec,
    CacheVersionError, decode_sample, iter_cache_shard, read_index, write_index)

H, K = 48, 8
KEYS = ("position", "kind", "token_ids", "hidden", "topk_ids", "topk_logprobs", "logit_stats")


def spec_of(hidden_dtype="float16", logprob_dtype="float32", store="zarr", **kw) -> CacheSpec:
    return CacheSpec(hidden_size=H, vocab_size=32000, top_k=K, hidden_dtype=hidden_dtype, logprob_dtype=logprob_dtype,
                     store=store, **kw)


def make_samples(seed: int = 0, n: int = 40, long_every: int = 13) -> list[tuple[str, dict]]:
    """Random samples; includes zero-token samples and some longer than the reader's block."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = 0 if i % 7 == 3 else int(rng.integers(1, 30))
        if i % long_every == 5:
            t = 150
        hidden = (rng.standard_normal((t, H)) * rng.choice([1e-3, 1.0, 40.0])).astype(np.float32)
        if t:
            hidden[0, :] = 0.0  # an all-zero row (int8 scale 0)
        lp = -np.abs(rng.standard_normal((t, K))).astype(np.float32) * 5
        out.append((f"id/{i}-ü", dict(position=np.sort(rng.choice(4000, t, replace=False)),
                                      kind=rng.integers(0, 3, t).astype(np.uint8), token_ids=rng.integers(0, 32000, t),
                                      hidden=hidden, topk_ids=rng.integers(0, 32000, (t, K)), topk_logprobs=lp,
                                      logit_stats=rng.standard_normal((t, 2)).astype(np.float32))))
    out.append(("trailing-empty", dict(position=np.zeros(0, int), kind=np.zeros(0, np.uint8),
                                       token_ids=np.zeros(0, int), hidden=np.zeros((0, H), np.float32),
                                       topk_ids=np.zeros((0, K), int), topk_logprobs=np.zeros((0, K), np.float32),
                                       logit_stats=np.zeros((0, 2), np.float32))))
    return out


def write_shard(path: Path, spec: CacheSpec, samples, **kw) -> dict:
    w = CacheShardWriter(path, spec, **kw)
    for sid, d in samples:
        w.add(sid, d)
    return w.close()


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """Independent bf16 rounding of finite values: pick the nearer of the two neighbouring bf16
    values (in float64; the step past the largest finite one counts as 2^128 and gives inf),
    ties to the even mantissa. Non-finite inputs pass through."""
    x = np.ascontiguousarray(x, np.float32)
    b = x.view(np.uint32).astype(np.uint64)
    lo = (b & 0xFFFF0000).astype(np.uint32)
    hi = (lo.astype(np.uint64) + 0x10000).astype(np.uint32)
    flo = lo.view(np.float32).astype(np.float64)
    with np.errstate(invalid="ignore"):
        fhi = np.where((hi & 0x7FFFFFFF) == 0x7F800000, np.copysign(2.0 ** 128, x.astype(np.float64)),
                       hi.view(np.float32).astype(np.float64))
    xd = np.where(np.isfinite(x), x, 0).astype(np.float64)
    dlo, dhi = np.abs(xd - flo), np.abs(fhi - xd)
    lo_even = ((lo >> 16) & 1) == 0
    pick_lo = (dlo < dhi) | ((dlo == dhi) & lo_even)
    return np.where(np.isfinite(x), np.where(pick_lo, lo, hi).view(np.float32), x)


def tree(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_samples(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["sample_id"] == y["sample_id"]
        for k in KEYS:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            assert x[k].tobytes() == y[k].tobytes(), (x["sample_id"], k)


@pytest.mark.parametrize("hidden_dtype", HIDDEN_DTYPES)
@pytest.mark.parametrize("logprob_dtype", LOGPROB_DTYPES)
def test_round_trip_and_stores_agree(tmp_path, hidden_dtype, logprob_dtype):
    samples = make_samples()
    got = {}
    for store in ("zarr", "webdataset"):
        spec = spec_of(hidden_dtype, logprob_dtype, store)
        # small chunks and read blocks: samples straddle chunks, blocks and Zarr shards
        info = write_shard(tmp_path / spec.shard_name(0), spec, samples, chunk_rows=32)
        assert info["n_samples"] == len(samples)
        assert info["n_rows"] == sum(len(d["token_ids"]) for _, d in samples)
        assert info["bytes"] > 0 and info["sha256"] == atomic.sha256_path(tmp_path / spec.shard_name(0))
        got[store] = list(iter_cache_shard(tmp_path / spec.shard_name(0), spec, info["sha256"], block_rows=64))
    assert_same_samples(got["zarr"], got["webdataset"])

    for (sid, d), s in zip(samples, got["zarr"]):
        assert s["sample_id"] == sid
        n = len(d["token_ids"])
        assert s["token_ids"].dtype == np.int32 and s["token_ids"].tolist() == list(d["token_ids"])
        assert s["position"].tolist() == list(d["position"]) and s["kind"].tolist() == list(d["kind"])
        assert s["topk_ids"].dtype == np.int32 and np.array_equal(s["topk_ids"], d["topk_ids"])
        assert s["logit_stats"].dtype == np.float32 and np.array_equal(s["logit_stats"], d["logit_stats"])
        assert s["topk_logprobs"].dtype == np.float32 and s["topk_logprobs"].shape == (n, K)
        want_lp = d["topk_logprobs"] if logprob_dtype == "float32" else d["topk_logprobs"].astype(np.float16).astype(np.float32)
        assert np.array_equal(s["topk_logprobs"], want_lp)
        x, y = d["hidden"], s["hidden"]
        assert y.dtype == np.float32 and y.shape == (n, H)
        if hidden_dtype == "float16":
            assert np.array_equal(y, x.astype(np.float16).astype(np.float32))
        elif hidden_dtype == "bfloat16":
            assert np.array_equal(y, bf16_reference(x))
            assert np.all(np.abs(y - x) <= np.abs(x) * 2.0 ** -8)
        else:
            scale = np.abs(x).max(axis=1, initial=0.0) / 127
            assert np.all(np.abs(y - x) <= scale[:, None] / 2 * (1 + 1e-5) + 1e-30)
            assert np.all(y[np.abs(x).max(axis=1, initial=0) == 0] == 0)


def test_bf16_matches_torch_and_handles_specials(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, H)) * 10).astype(np.float32)
    # exact ties (bits ...8000) in both directions, specials
    x[0, :4] = np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00008000], dtype=np.uint32).view(np.float32)
    x[1, :4] = [np.inf, -np.inf, 0.0, -0.0]
    x[2, 0] = np.nan
    spec = spec_of("bfloat16")
    t = lambda n: np.zeros((n, K), int)  # noqa: E731
    # a torch tensor is accepted as input too
    write_shard(tmp_path / "s.zarr", spec, [("a", dict(position=np.arange(6), kind=np.full(6, 2, np.uint8),
                                                      token_ids=np.arange(6), hidden=torch.from_numpy(x), topk_ids=t(6),
                                                      topk_logprobs=np.zeros((6, K), np.float32),
                                                      logit_stats=np.zeros((6, 2), np.float32)))])
    (s,) = iter_cache_shard(tmp_path / "s.zarr")
    y = s["hidden"]
    assert np.isnan(y[2, 0])
    ok = ~np.isnan(x)
    ref_torch = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(y[ok], ref_torch[ok]) and np.array_equal(y[ok], bf16_reference(x)[ok])
    assert np.signbit(y[1, 3])


@pytest.mark.parametrize("store", ["zarr", "webdataset"])
def test_same_adds_same_bytes(tmp_path, store):
    spec = spec_of("int8", "float16", store)
    samples = make_samples(seed=5, n=25)
    a = write_shard(tmp_path / "a" / spec.shard_name(0), spec, samples, chunk_rows=16)
    b = write_shard(tmp_path / "b" / spec.shard_name(0), spec, samples, chunk_rows=16)
    ta, tb = tree(tmp_path / "a" / spec.shard_name(0)), tree(tmp_path / "b" / spec.shard_name(0))
    assert ta == tb and a["sha256"] == b["sha256"]
    if store == "zarr":
        assert "zarr.json" in ta and "hidden/zarr.json" in ta and "hidden.scale/zarr.json" in ta
        for name, data in ta.items():
            if name.endswith("zarr.json"):
                json.loads(data)  # plain JSON, no timestamps
    else:
        with tarfile.open(tmp_path / "a" / spec.shard_name(0)) as tf:
            members = tf.getmembers()
        assert [m.name for m in members][-1] == "__end__.json"
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)
    # an empty shard is fine too, and deterministic
    e1 = write_shard(tmp_path / "e1" / spec.shard_name(0), spec, [])
    write_shard(tmp_path / "e2" / spec.shard_name(0), spec, [])
    assert e1["n_samples"] == 0 and e1["n_rows"] == 0
    assert tree(tmp_path / "e1" / spec.shard_name(0)) == tree(tmp_path / "e2" / spec.shard_name(0))
    assert list(iter_cache_shard(tmp_path / "e1" / spec.shard_name(0), spec, e1["sha256"])) == []


def test_webdataset_library_reads_tar(tmp_path):
    wds = pytest.importorskip("webdataset")
    spec = spec_of("float16", "float32", "webdataset")
    samples = make_samples(seed=2, n=10)
    write_shard(tmp_path / "s.tar", spec, samples)
    ours = list(iter_cache_shard(tmp_path / "s.tar"))
    blobs = [r["tcblob"] for r in wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False) if "tcblob" in r]
    assert_same_samples(ours, [decode_sample(b, spec) for b in blobs])


def test_abort_and_failed_close_leave_nothing(tmp_path, monkeypatch):
    samples = make_samples(seed=3, n=5)
    for store in ("zarr", "webdataset"):
        spec = spec_of(store=store)
        final = tmp_path / spec.shard_name(0)
        w = CacheShardWriter(final, spec)
        for sid, d in samples:
            w.add(sid, d)
        w.abort()
        assert not final.exists() and not atomic.tmp_name(final).exists()

        def boom(*a, **k):
            raise OSError("disk on fire")

        w = CacheShardWriter(final, spec)
        for sid, d in samples:
            w.add(sid, d)
        with monkeypatch.context() as m:
            m.setattr(os, "replace", boom)
            with pytest.raises(OSError, match="disk on fire"):
                w.close()
        assert not final.exists() and not atomic.tmp_name(final).exists()
        assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_final_path(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_teacher_cache import make_samples
        from llavadi.schemas.teacher_cache import CacheShardWriter, CacheSpec
        out = Path({str(tmp_path)!r})
        ws = []
        for store in ("zarr", "webdataset"):
            spec = CacheSpec(hidden_size={H}, top_k={K}, store=store)
            w = CacheShardWriter(out / spec.shard_name(0), spec)
            for sid, d in make_samples(seed=4, n=20):
                w.add(sid, d)
            ws.append(w)
        print("added", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "added" in p.stdout
    assert not (tmp_path / "part-00000.zarr").exists() and not (tmp_path / "part-00000.tar").exists()
    atomic.remove_stale_tmp(tmp_path)  # the tar writer's partial temporary, if any
    assert list(tmp_path.iterdir()) == []


def flip_byte(path: Path) -> None:
    f = path if path.is_file() else max((p for p in path.rglob("*") if p.is_file() and "/c/" in p.as_posix()),
                                        key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x5A
    f.write_bytes(bytes(data))


def build_cache(root: Path, store: str, n_shards: int = 3) -> tuple[CacheSpec, list[list]]:
    spec = spec_of("bfloat16", "float32", store)
    entries, per_shard = [], []
    for i in range(n_shards):
        samples = make_samples(seed=10 + i, n=12)
        info = write_shard(root / spec.shard_name(i), spec, samples, chunk_rows=64)
        entries.append({"shard": i, "file": info["file"], "n_samples": info["n_samples"],
                        "n_rows": info["n_rows"], "sha256": info["sha256"]})
        per_shard.append(samples)
    meta = spec.to_meta() | {"teacher": {"model": "tiny", "weights_sha256": "ab" * 32},
                             "tokenizer_sha256": "cd" * 32, "chat_template_sha256": "ef" * 32}
    write_index(root, meta, entries)
    return spec, per_shard


@pytest.mark.parametrize("store", ["zarr", "webdataset"])
def test_index_reader_and_corruption(tmp_path, store):
    spec, per_shard = build_cache(tmp_path, store)
    idx = read_index(tmp_path)
    assert idx["schema_version"] == SCHEMA_VERSION and idx["meta"]["vocab_size"] == 32000
    r = CacheReader(tmp_path)
    assert r.meta["store"] == store and r.spec == spec and len(r) == sum(len(s) for s in per_shard)
    got = list(r)
    assert [s["sample_id"] for s in got] == [sid for samples in per_shard for sid, _ in samples]
    sub = list(CacheReader(tmp_path, shards=[2, 0]))
    assert [s["sample_id"] for s in sub] == [sid for i in (2, 0) for sid, _ in per_shard[i]]

    bad = tmp_path / spec.shard_name(1)
    good_sha = idx["shards"][1]["sha256"]
    flip_byte(bad)
    with pytest.raises(CacheCorruptError) as ei:
        list(iter_cache_shard(bad, spec, expected_sha256=good_sha))
    msg = str(ei.value)
    assert str(bad) in msg and good_sha in msg and atomic.sha256_path(bad) in msg
    with pytest.raises(CacheCorruptError, match=spec.shard_name(1)):
        list(CacheReader(tmp_path))
    # shard 0 still reads; the corrupt shard fails even without the checksum list (chunk crc)
    assert len(list(CacheReader(tmp_path, shards=[0]))) == len(per_shard[0])
    with pytest.raises(CacheCorruptError, match=spec.shard_name(1)):
        list(CacheReader(tmp_path, verify=False, shards=[1]))


def test_truncated_tar(tmp_path):
    spec = spec_of(store="webdataset")
    path = tmp_path / spec.shard_name(7)
    write_shard(path, spec, make_samples(seed=6, n=15))
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        boundary = [m.offset for m in tf.getmembers()][-1]  # the trailer's header: cut at a member boundary
    for cut in (len(data) // 2, len(data) // 2 + 3, 700, boundary, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CacheCorruptError, match=spec.shard_name(7)):
            list(iter_cache_shard(path, spec))
    path.unlink()
    with pytest.raises(CacheCorruptError, match="missing"):
        list(iter_cache_shard(path, spec))


def test_validation_and_sizes(tmp_path):
    spec = spec_of()
    assert spec.ext == "zarr" and spec_of(store="webdataset").ext == "tar"
    w = CacheShardWriter(tmp_path / "x.zarr", spec)
    ok = dict(position=np.arange(3), kind=np.full(3, 2, np.uint8), token_ids=np.arange(3),
              hidden=np.zeros((3, H), np.float32), topk_ids=np.zeros((3, K), int),
              topk_logprobs=np.zeros((3, K), np.float32), logit_stats=np.zeros((3, 2), np.float32))
    w.add("a", ok)
    with pytest.raises(ValueError, match="duplicate"):
        w.add("a", ok)
    with pytest.raises(ValueError, match="hidden"):
        w.add("b", ok | {"hidden": np.zeros((3, H + 1), np.float32)})
    with pytest.raises(ValueError, match="lacks"):  # a declared field missing
        w.add("c", {k: v for k, v in ok.items() if k != "logit_stats"})
    with pytest.raises(ValueError, match="not declared"):
        w.add("d", ok | {"sampled_ids": np.zeros((3, 4), int)})
    with pytest.raises(ValueError, match="token ids"):  # an id the vocabulary's bit width cannot hold
        w.add("e", ok | {"token_ids": np.array([0, 1, 1 << 16])})
    w.abort()
    with pytest.raises(ValueError):
        spec_of(hidden_dtype="fp8")
    with pytest.raises(ValueError, match="twice"):
        spec_of(hidden_layers=(-1, -1))
    with pytest.raises(ValueError, match="store"):
        write_index(tmp_path, {"hidden_size": H, "vocab_size": 10}, [])
    # spec mismatch between the reader's expectation and the shard
    write_shard(tmp_path / "y.zarr", spec, [("a", ok)])
    with pytest.raises(ValueError, match="top_k"):
        list(iter_cache_shard(tmp_path / "y.zarr", spec_of(top_k=K + 1) if False else
                              CacheSpec(hidden_size=H, vocab_size=32000, top_k=K + 1)))
    # uncompressed bytes per row from the declarations, by hand: position 4, kind 1, token id 2 (uint16),
    # hidden 2·H (float16) or H + 4 (int8 + scale), top-k ids 2·k, log-probs 4·k or 2·k, stats 8
    def total(sp):
        return sum(sp.bytes_per_row().values())

    assert total(CacheSpec(hidden_size=256, top_k=64)) == 4 + 1 + 2 + 512 + 64 * 2 + 64 * 4 + 8
    assert total(CacheSpec(hidden_size=256, top_k=64, hidden_dtype="int8", logprob_dtype="float16")) == \
        4 + 1 + 2 + 256 + 4 + 64 * 2 + 64 * 2 + 8
    # a vocabulary over 65 536 ids: 18-bit packed ids (152 064 ids, Qwen2's: ceil(log2) = 18)
    sp = CacheSpec(hidden_size=8, vocab_size=152064, hidden_layers=(), top_k=64, logprob_dtype="float16")
    assert sp.bytes_per_row() == {"position": 4, "kind": 1, "token_ids": 3, "topk_ids": 144, "topk_logprobs": 128,
                                  "logit_stats": 8}


@pytest.mark.parametrize("vocab", [300, 65536, 65537, 152064, 262208])
def test_id_packing_round_trips_every_width(vocab):
    from llavadi.schemas.teacher_cache import id_bits, pack_ids, unpack_ids

    bits = id_bits(vocab)
    assert bits == (16 if vocab <= 65536 else int(np.ceil(np.log2(vocab))))
    rng = np.random.default_rng(vocab)
    ids = rng.integers(0, vocab, (37, 13))
    ids[0, :] = vocab - 1  # the largest id
    ids[1, :] = 0
    packed = pack_ids(ids, bits)
    assert packed.shape == (37, -(-13 * bits // 8)) and packed.dtype == np.uint8
    assert np.array_equal(unpack_ids(packed, bits, 13), ids)
    # bit layout by hand for one row: id j occupies bits [j·b, (j+1)·b) little-endian
    row = ids[2]
    as_int = sum(int(x) << (j * bits) for j, x in enumerate(row))
    assert as_int.to_bytes(packed.shape[1], "little") == packed[2].tobytes()


@pytest.mark.parametrize("store", ["zarr", "webdataset"])
def test_every_field_round_trips_with_sample_fields(tmp_path, store):
    """Several hidden layers, sampled logits with their log-probs (temperature != 1), affinity blocks of
    per-sample shapes (empty for text-only samples), 18-bit ids."""
    spec = CacheSpec(hidden_size=H, vocab_size=152064, positions="all", hidden_layers=(-1, 2, 0), hidden_dtype="int8",
                     logits="sampled", samples=5, sample_temperature=0.7, affinity=True, image_dedup=False, store=store)
    names = [f.name for f in spec.fields()]
    assert names == ["position", "kind", "token_ids", "hidden", "hidden@2", "hidden@0", "sampled_ids",
                     "sampled_logprobs", "logit_stats", "affinity"]
    rng = np.random.default_rng(9)
    data = []
    for i in range(12):
        n = int(rng.integers(0, 40))
        rows = {"position": np.arange(n), "kind": rng.integers(0, 3, n).astype(np.uint8),
                "token_ids": rng.integers(0, 152064, n), "sampled_ids": np.sort(rng.integers(0, 152064, (n, 5)), -1),
                "sampled_logprobs": -rng.random((n, 5)).astype(np.float32),
                "logit_stats": rng.standard_normal((n, 2)).astype(np.float32)}
        for layer in ("hidden", "hidden@2", "hidden@0"):
            rows[layer] = rng.standard_normal((n, H)).astype(np.float32)
        aff = rng.uniform(-1, 1, (int(rng.integers(0, 7)) if i % 3 else 0, n)).astype(np.float32)
        data.append((f"s{i}", rows, aff))
    w = CacheShardWriter(tmp_path / spec.shard_name(0), spec, chunk_rows=16)
    for sid, rows, aff in data:
        w.add(sid, rows, {"affinity": aff})
    with pytest.raises(ValueError, match="sorted"):  # the draws are delta-coded: they must come sorted
        w.add("unsorted", data[1][1] | {"sampled_ids": data[1][1]["sampled_ids"][:, ::-1]})
    info = w.close()
    got = list(iter_cache_shard(tmp_path / spec.shard_name(0), spec, info["sha256"], block_rows=16))
    for (sid, rows, aff), s in zip(data, got):
        assert s["sample_id"] == sid
        for k in ("position", "kind", "token_ids", "sampled_ids"):
            assert np.array_equal(s[k], rows[k]), k
        for k in ("hidden", "hidden@2", "hidden@0"):
            scale = np.abs(rows[k]).max(axis=1, initial=0.0) / 127
            assert np.all(np.abs(s[k] - rows[k]) <= scale[:, None] / 2 * (1 + 1e-5) + 1e-30), k
        assert np.array_equal(s["sampled_logprobs"], rows["sampled_logprobs"])
        assert s["affinity"].shape == aff.shape
        assert np.array_equal(s["affinity"], aff.astype(np.float16).astype(np.float32))


def test_image_row_store_keeps_the_lowest_shards_copy(tmp_path):
    from llavadi.schemas.teacher_cache import ImageRowStore, image_key
    from llavadi.schemas.teacher_cache.fields import check_rows

    spec = CacheSpec(hidden_size=4, vocab_size=100, top_k=2, positions="all")
    key = image_key([1, 2, 3], {"pixel_values": np.ones((1, 3, 2, 2), np.float32), "input_ids": np.zeros((1, 3))})
    assert key == image_key([1, 2, 3], {"pixel_values": np.ones((1, 3, 2, 2), np.float32)})  # ids/mask ignored
    assert key != image_key([1, 2, 4], {"pixel_values": np.ones((1, 3, 2, 2), np.float32)})
    assert key != image_key([1, 2, 3], {"pixel_values": np.zeros((1, 3, 2, 2), np.float32)})

    def rows(v):
        return check_rows(spec, "x", {"position": np.arange(2), "kind": np.zeros(2, np.uint8), "token_ids": np.arange(2),
                                      "hidden": np.full((2, 4), v, np.float32), "topk_ids": np.zeros((2, 2), int),
                                      "topk_logprobs": np.zeros((2, 2), np.float32),
                                      "logit_stats": np.zeros((2, 2), np.float32)})

    st = ImageRowStore(tmp_path, spec)
    assert st.put(key, 3, rows(3.0), 2) > 0  # shard 3 first
    assert st.put(key, 5, rows(5.0), 2) == 0  # a higher shard sees a copy from a lower one: skipped
    assert st.put(key, 1, rows(1.0), 2) > 0  # a lower shard writes its own
    assert st.put(key, 1, rows(9.0), 2) == 0  # the same shard again (a resumed run): kept
    assert st.finalize() == {"images": 1, "bytes": st.path(key).stat().st_size}
    assert float(st.read(key)["hidden"][0, 0]) == 1.0  # the lowest shard's copy
    assert st.finalize()["images"] == 1 and float(st.read(key)["hidden"][0, 0]) == 1.0  # idempotent
    assert [p.name for p in (tmp_path / "image_rows").rglob("*") if p.is_file()] == [f"{key.hex()}.tcblob"]
    with pytest.raises(CacheCorruptError, match="missing"):
        st.read(b"\x00" * 32)


def test_version_1_cache_is_refused_with_the_rebuild_command(tmp_path):
    run = tmp_path / "myrun"
    (run / "cache_teacher").mkdir(parents=True)
    (run / "cache_teacher" / "index.json").write_text(json.dumps(
        {"schema_version": 1, "meta": {"hidden_size": 8, "top_k": 2, "hidden_dtype": "float16",
                                       "logprob_dtype": "float32", "store": "zarr"}, "shards": []}))
    with pytest.raises(CacheVersionError, match=f"llavadi cache-teacher {run.resolve()} --force"):
        CacheReader(run / "cache_teacher")


def test_format_table_lists_every_field():
    from llavadi.schemas.teacher_cache import format_table

    table = format_table()
    for name in ("position", "kind", "token_ids", "hidden", "hidden@L", "topk_ids", "topk_logprobs", "sampled_ids",
                 "sampled_logprobs", "logit_stats", "affinity", "image_key"):
        assert f"| `{name}` |" in table, name
