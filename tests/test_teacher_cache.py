"""Teacher cache contract (design §5): round trips per dtype, Zarr ≡ WebDataset, determinism,
crash safety and corruption detection."""
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
    bytes_per_token, decode_blob, iter_cache_shard, read_index, write_index)

H, K = 48, 8
KEYS = ("token_ids", "hidden", "topk_ids", "topk_logprobs", "logit_stats")


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
        out.append((f"id/{i}-ü", dict(token_ids=rng.integers(0, 32000, t), hidden=hidden,
                                      topk_ids=rng.integers(0, 32000, (t, K)), topk_logprobs=lp,
                                      logit_stats=rng.standard_normal((t, 2)).astype(np.float32))))
    out.append(("trailing-empty", dict(token_ids=np.zeros(0, int), hidden=np.zeros((0, H), np.float32),
                                       topk_ids=np.zeros((0, K), int), topk_logprobs=np.zeros((0, K), np.float32),
                                       logit_stats=np.zeros((0, 2), np.float32))))
    return out


def write_shard(path: Path, spec: CacheSpec, samples, **kw) -> dict:
    w = CacheShardWriter(path, spec, **kw)
    for sid, d in samples:
        w.add(sid, **d)
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
        spec = CacheSpec(H, K, hidden_dtype, logprob_dtype, store)
        # small chunks and read blocks: samples straddle chunks, blocks and Zarr shards
        info = write_shard(tmp_path / spec.shard_name(0), spec, samples, chunk_rows=32)
        assert info["n_samples"] == len(samples)
        assert info["n_tokens"] == sum(len(d["token_ids"]) for _, d in samples)
        assert info["bytes"] > 0 and info["sha256"] == atomic.sha256_path(tmp_path / spec.shard_name(0))
        got[store] = list(iter_cache_shard(tmp_path / spec.shard_name(0), spec, info["sha256"], block_rows=64))
    assert_same_samples(got["zarr"], got["webdataset"])

    for (sid, d), s in zip(samples, got["zarr"]):
        assert s["sample_id"] == sid
        n = len(d["token_ids"])
        assert s["token_ids"].dtype == np.int32 and s["token_ids"].tolist() == list(d["token_ids"])
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
    spec = CacheSpec(H, K, "bfloat16", store="zarr")
    t = lambda n: np.zeros((n, K), int)  # noqa: E731
    # a torch tensor is accepted as input too
    write_shard(tmp_path / "s.zarr", spec, [("a", dict(token_ids=np.arange(6), hidden=torch.from_numpy(x), topk_ids=t(6),
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
    spec = CacheSpec(H, K, "int8", "float16", store)
    samples = make_samples(seed=5, n=25)
    a = write_shard(tmp_path / "a" / spec.shard_name(0), spec, samples, chunk_rows=16)
    b = write_shard(tmp_path / "b" / spec.shard_name(0), spec, samples, chunk_rows=16)
    ta, tb = tree(tmp_path / "a" / spec.shard_name(0)), tree(tmp_path / "b" / spec.shard_name(0))
    assert ta == tb and a["sha256"] == b["sha256"]
    if store == "zarr":
        assert "zarr.json" in ta and "hidden/zarr.json" in ta and "hidden_scale/zarr.json" in ta
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
    assert e1["n_samples"] == 0 and e1["n_tokens"] == 0
    assert tree(tmp_path / "e1" / spec.shard_name(0)) == tree(tmp_path / "e2" / spec.shard_name(0))
    assert list(iter_cache_shard(tmp_path / "e1" / spec.shard_name(0), spec, e1["sha256"])) == []


def test_webdataset_library_reads_tar(tmp_path):
    wds = pytest.importorskip("webdataset")
    spec = CacheSpec(H, K, "float16", "float32", "webdataset")
    samples = make_samples(seed=2, n=10)
    write_shard(tmp_path / "s.tar", spec, samples)
    ours = list(iter_cache_shard(tmp_path / "s.tar"))
    blobs = [r["tcblob"] for r in wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False) if "tcblob" in r]
    assert_same_samples(ours, [decode_blob(b) for b in blobs])


def test_abort_and_failed_close_leave_nothing(tmp_path, monkeypatch):
    samples = make_samples(seed=3, n=5)
    for store in ("zarr", "webdataset"):
        spec = CacheSpec(H, K, store=store)
        final = tmp_path / spec.shard_name(0)
        w = CacheShardWriter(final, spec)
        for sid, d in samples:
            w.add(sid, **d)
        w.abort()
        assert not final.exists() and not atomic.tmp_name(final).exists()

        def boom(*a, **k):
            raise OSError("disk on fire")

        w = CacheShardWriter(final, spec)
        for sid, d in samples:
            w.add(sid, **d)
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
            spec = CacheSpec({H}, {K}, store=store)
            w = CacheShardWriter(out / spec.shard_name(0), spec)
            for sid, d in make_samples(seed=4, n=20):
                w.add(sid, **d)
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
    spec = CacheSpec(H, K, "bfloat16", "float32", store)
    entries, per_shard = [], []
    for i in range(n_shards):
        samples = make_samples(seed=10 + i, n=12)
        info = write_shard(root / spec.shard_name(i), spec, samples, chunk_rows=64)
        entries.append({"shard": i, "file": info["file"], "n_samples": info["n_samples"],
                        "n_tokens": info["n_tokens"], "sha256": info["sha256"]})
        per_shard.append(samples)
    meta = spec.to_meta() | {"vocab_size": 32000, "teacher": {"model": "tiny", "weights_sha256": "ab" * 32},
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
    spec = CacheSpec(H, K, store="webdataset")
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
    spec = CacheSpec(H, K)
    assert spec.ext == "zarr" and CacheSpec(H, K, store="webdataset").ext == "tar"
    w = CacheShardWriter(tmp_path / "x.zarr", spec)
    ok = dict(token_ids=np.arange(3), hidden=np.zeros((3, H), np.float32), topk_ids=np.zeros((3, K), int),
              topk_logprobs=np.zeros((3, K), np.float32), logit_stats=np.zeros((3, 2), np.float32))
    w.add("a", **ok)
    with pytest.raises(ValueError, match="duplicate"):
        w.add("a", **ok)
    with pytest.raises(ValueError, match="hidden"):
        w.add("b", **(ok | {"hidden": np.zeros((3, H + 1), np.float32)}))
    w.abort()
    with pytest.raises(ValueError):
        CacheSpec(H, K, hidden_dtype="fp8")
    with pytest.raises(ValueError, match="store"):
        write_index(tmp_path, {"hidden_size": H, "top_k": K, "hidden_dtype": "int8", "logprob_dtype": "float32"}, [])
    # spec mismatch between the reader's expectation and the shard
    write_shard(tmp_path / "y.zarr", spec, [("a", ok)])
    with pytest.raises(ValueError, match="top_k"):
        list(iter_cache_shard(tmp_path / "y.zarr", CacheSpec(H, K + 1)))
    assert bytes_per_token(CacheSpec(256, 64)) == 4 + 512 + 64 * 8 + 8
    assert bytes_per_token(CacheSpec(256, 64, "int8", "float16")) == 4 + 256 + 4 + 64 * 6 + 8
