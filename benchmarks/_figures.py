"""The README's figures table, rendered from ``benchmarks/results.json`` (``run_all.py`` writes
both). Each row names the figure, the JSON key it comes from and the target; a missing figure
shows as "—" (its script failed or was not run), never as a stale number."""
from __future__ import annotations

import re
from pathlib import Path

START, END = "<!-- bench-table:start (make bench writes this block) -->", "<!-- bench-table:end -->"

# (script, key in its JSON, figure, target shown, format)
FIGURES = [
    ("ingest", "rss_ratio_100k_over_10k", "ingest peak RSS, 100k ÷ 10k records", "flat (≈ 1)", "{:.3f}"),
    ("ingest", "records_per_s_100k", "ingest records/s, 100k, local executor", "—", "{:,.0f}"),
    ("ingest", "ray_records_per_s_10k", "ingest records/s, 10k, Ray executor (start-up included)", "—", "{:,.0f}"),
    ("regenerate", "ratio_midsize", "regenerate: vLLM ÷ HF `generate` at its best batch size, 164M teacher, "
     "64 prompts, 8–128 forced tokens", "≥ 3", "{:.2f}"),
    ("regenerate", "ratio_midsize_vs_hf_oracle_sorted", "… the same ÷ HF with batches sorted by answer length "
     "(an oracle: lengths are unknown before generating)", "reported", "{:.2f}"),
    ("regenerate", "ratio_midsize_vllm_compiled", "… vLLM compiled (`teacher.enforce_eager=false`) ÷ HF best",
     "reported", "{:.2f}"),
    ("regenerate", "ratio_midsize_vllm_no_prefix_cache", "… vLLM without prefix cache "
     "(`teacher.prefix_caching=false`) ÷ HF best", "reported", "{:.2f}"),
    ("regenerate", "vllm_tok_s_midsize", "regenerate vLLM tokens/s, 164M teacher", "—", "{:.0f}"),
    ("regenerate", "ratio_tiny", "regenerate vLLM ÷ HF, tiny teacher, 32 × 16 tokens", "reported", "{:.2f}"),
    ("cache_teacher", "midsize_ratio", "cache-teacher stage ÷ bare teacher forward, 164M teacher", "≤ 1.05",
     "{:.2f}"),
    ("cache_teacher", "midsize_ratio_all_positions", "… the same with `positions=all` (head and rows at every "
     "position, image rows once per image)", "reported", "{:.2f}"),
    ("cache_teacher", "tiny_ratio", "cache-teacher stage ÷ bare forward, tiny teacher (head > LM)", "reported",
     "{:.2f}"),
    ("cache_teacher", "engine_vllm_speedup_over_hf", "cache-teacher `engine=hf` seconds ÷ `engine=vllm` seconds "
     "(> 1: vLLM faster), 164M teacher, `positions=answer`, the stage's defaults (vLLM eager on CPU)", "reported",
     "{:.2f}"),
    ("cache_teacher", "engine_vllm_speedup_over_hf_old", "… the same before issue #23 (vLLM forcer: one request per "
     "`generate`, `prompt_logprobs`, a forward hook)", "reported", "{:.2f}"),
    ("cache_teacher", "row_bytes_per_row_float16_float32", "cache B/row, Zarr row arrays, fp16 hidden + top-64 "
     "fp32 log-probs (H 768, random-weight teacher)", "—", "{:,.0f}"),
    ("cache_teacher", "row_bytes_per_row_int8_float16", "… int8 hidden + fp16 log-probs", "—", "{:,.0f}"),
    ("cache_teacher", "row_bytes_per_row_h5120_bfloat16_float32", "… bf16 hidden + fp32 log-probs at H 5120 "
     "(13B teacher: 5120-wide arrays × the compression measured at 768)", "—", "{:,.0f}"),
    ("cache_teacher", "row_bytes_per_row_logits_only_topk64", "logits-only cache, top-64 + fp16 log-probs, Zarr "
     "row arrays (B/row; random-weight teacher: its near-uniform log-probs compress more than a trained one's)",
     "≤ 250", "{:,.0f}"),
    ("cache_teacher", "bytes_per_row_logits_only_topk64", "… whole shard ÷ rows (ids, offsets, framing: ~3 rows "
     "per sample here)", "reported", "{:,.0f}"),
    ("cache_teacher", "row_bytes_per_row_sampled16", "logits-only cache, 16 sampled ids (RS-KD), Zarr row arrays "
     "(B/row)", "≤ 48", "{:,.1f}"),
    ("cache_teacher", "bytes_per_row_sampled16", "… whole shard ÷ rows", "reported", "{:,.0f}"),
    ("cache_teacher", "bytes_per_row_logits_only_topk64_long_answers", "logits-only top-64 (fp16 log-probs), whole "
     "shard ÷ rows, answers of ~40 tokens (tiny teacher)", "≤ 250", "{:,.1f}"),
    ("cache_teacher", "bytes_per_row_sampled16_long_answers", "logits-only 16 sampled ids, whole shard ÷ rows, "
     "answers of ~40 tokens (tiny teacher)", "≤ 48", "{:,.1f}"),
    ("cache_teacher", "rss_ratio_10x", "cache-teacher peak RSS, 10× ÷ 1× the samples (`positions=all`, tiny "
     "teacher)", "≤ 1.1", "{:.3f}"),
    ("cache_teacher", "read_zarr_samples_per_s", "cache read samples/s, Zarr", "—", "{:,.0f}"),
    ("cache_teacher", "read_webdataset_samples_per_s", "cache read samples/s, WebDataset", "—", "{:,.0f}"),
    ("train_student", "kd_step_ratio_mid_topk", "train step top-k KD ÷ CE-only, ≈107M student", "≤ 1.15", "{:.3f}"),
    ("train_student", "kd_step_ratio_mid_exact", "train step exact KD ÷ CE-only, ≈107M student", "≤ 1.15",
     "{:.3f}"),
    ("train_student", "kd_step_ratio_tiny_topk", "train step top-k KD ÷ CE-only, tiny student (8.7M)", "≤ 1.15",
     "{:.3f}"),
    ("train_student", "kd_step_ratio_tiny_exact", "train step exact KD ÷ CE-only, tiny student (teacher head "
     "larger than the student)", "reported", "{:.3f}"),
    ("train_student", "kd_step_ratio_mid_all_topk", "train step all-token top-k KD + all-token feature ÷ CE-only "
     "(llavadi's CE: the head at the answer rows only), ≈107M student", "≤ 1.10", "{:.3f}"),
    ("train_student", "kd_step_ratio_mid_all_topk_vs_hf_ce", "… ÷ CE-only with logits at every position "
     "(transformers' `labels=` loss, as LLaVA trains)", "≤ 1.10", "{:.3f}"),
    ("train_student", "kd_step_ratio_mid_all_exact", "train step all-token exact KD + all-token feature ÷ CE-only, "
     "≈107M student", "reported", "{:.3f}"),
    ("train_student", "loader_over_trainer_w0", "loader ÷ trainer samples/s (0 workers)", "≥ 5", "{:.2f}"),
    ("train_student", "loader_over_trainer_w0_memo", "… with the prepared-sample memo (3 epochs: "
     "train_student.sample_memo_mb)", "reported", "{:.2f}"),
    ("train_student", "gc_mem_ratio", "train step peak memory with ÷ without gradient checkpointing, ≈107M "
     "student, batch 16", "reported", "{:.3f}"),
    ("train_student", "kd_mem_ratio_fused_over_naive", "exact-KD peak memory ÷ naive full logits, N 4096, "
     "V 32000 (the loop's fused path)", "≤ 0.25", "{:.3f}"),
    ("train_student", "kd_mem_ratio_all_exact_over_naive", "all-token exact-KD loss peak memory ÷ naive full "
     "logits, ≈107M student's rows of a `positions=all` cache", "≤ 0.25", "{:.3f}"),
    ("train_student", "rss_ratio_10x", "train-student peak RSS streaming 10× ÷ 1× the cached samples "
     "(all-token KD + feature)", "≤ 1.1", "{:.3f}"),
]
TARGET = re.compile(r"^(≤|≥) ([0-9.]+)$")


def _verdict(value: float, target: str) -> str:
    m = TARGET.match(target)
    if not m:
        return ""
    ok = value <= float(m.group(2)) if m.group(1) == "≤" else value >= float(m.group(2))
    return " ✓" if ok else " ✗"


def render(results: dict) -> str:
    m = results.get("machine", {})
    lines = [f"Measured {_when(results)} by `make bench` on {m.get('nproc')} CPU core(s), "
             f"{m.get('cpu_model')}, {m.get('mem_total_gb')} GiB, Python {m.get('python')}; "
             f"max 1-min load average during the runs: {_max_load(results)}.", "",
             "| figure | measured | target | script |", "|---|---|---|---|"]
    for script, key, label, target, fmt in FIGURES:
        res = results.get(script) or {}
        v = res.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            shown = fmt.format(v) + _verdict(float(v), target)
        else:
            shown = "—" + (f" ({res['error']})" if "error" in res else "")
        lines.append(f"| {label} | {shown} | {target} | `benchmarks/{script}.py` |")
    return "\n".join(lines)


def _when(results: dict) -> str:
    """The run's timestamp, or, where scripts were rerun alone (``run_all.py --only``, merged into the results
    file), each date with its scripts: ``measured_at`` of a script's section, else the file's ``timestamp``."""
    top = str(results.get("timestamp", "?"))
    dates: dict = {}
    for name, r in results.items():
        if isinstance(r, dict) and name not in ("machine", "runtimes_s"):
            dates.setdefault(str(r.get("measured_at", top))[:10], []).append(name)
    if len(dates) <= 1:
        return top
    return "; ".join(f"{', '.join(names)}: {d}" for d, names in sorted(dates.items())) + " —"


def _max_load(results: dict):
    loads = [r.get("max_loadavg_1m") for r in results.values() if isinstance(r, dict) and "max_loadavg_1m" in r]
    return max(loads) if loads else "not recorded"


def update_readme(readme: Path, results: dict) -> bool:
    """Replace the block between the markers; False when the README has no such block."""
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    a, b = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:a] + "\n" + render(results) + "\n" + text[b:])
    return True
