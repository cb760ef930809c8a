#!/usr/bin/env bash
# benchmarks/gpu_check.sh — the GPU figures of design §7 in one run (issue #15 item 5), for a lent
# GPU machine (e.g. one H200, 16 cores), in ≤ 8 minutes (BUDGET_S, default 470 s) install included:
#
#   cache-teacher stage ÷ bare teacher forward          target ≤ 1.05
#   regenerate vLLM ÷ HF generate tokens/s              target ≥ 3
#   student steps/s with DDP and FSDP on the GPUs there
#   KD step ÷ CE-only step (top-k and exact KD)         target ≤ 1.15
#   cache-teacher engine=vllm ÷ engine=hf (issue #23)   reported (last: its vLLM start-up compiles)
#
# on a teacher built there at a realistic width (LLaVA-1.5 layout: ViT-L/14-336 tower + a 1.1B-class
# Llama LM, ≈ 1.5B parameters, random weights, bf16) and a ≈ 0.6B student. What each figure is:
# benchmarks/_gpu_check.py (the Python steps; each reuses benchmarks/cache_teacher.py,
# regenerate.py, train_student.py).
#
# Usage:  bash benchmarks/gpu_check.sh            # on the GPU machine; figures in $OUT/gpu_check.json
#         bash benchmarks/gpu_check.sh --smoke    # tiny models on CPU: the code path (tests/test_gpu_check.py)
#         bash benchmarks/gpu_check.sh --dry-run  # print the plan, run nothing
# Environment: OUT (results folder; default a new temp folder), BUDGET_S, PYTHON (interpreter to use:
# skips the install), WHEELS (folder of wheels to install offline; default .whl/), GPU_CHECK_WORK
# (scratch folder, kept; default a temp folder, removed), GPU_CHECK_CAPS ("step=seconds …": per-step caps),
# GPU_CHECK_STEPS (the steps to run, in the default order; e.g. "env setup engines" for one figure).
#
# Python: with network, the project's own GPU setup (.ci/setup-venv.sh in a fresh venv: the CUDA
# `vllm` wheel, which brings its torch, + requirements.txt + llavadi). Without network (this
# workplace's lent machines reach nothing): the machine's python3 (torch + transformers there)
# plus the wheels in $WHEELS for what it lacks — zarr, numcodecs, crc32c, donfig, webdataset,
# braceexpand, ijson, wordllama (the LLaMA-2 tokenizer file); fetch them on a machine with network:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     zarr numcodecs crc32c donfig webdataset braceexpand ijson wordllama==0.4.0.post1
# (add `--platform manylinux_2_28_x86_64` etc. where pip finds none). vLLM's CUDA wheel (hundreds of
# MB) cannot travel that way: offline, the regenerate figure is skipped with a note in the JSON.
# On a machine lent through a device tool that copies the working tree and returns $OUT: put the
# wheels in .whl/ (git-ignored there), carry it, and give the command a limit above BUDGET_S
# (e.g. 540 s): `bash benchmarks/gpu_check.sh`.
#
# Robustness: every step runs under `timeout` within what is left of the budget; each figure is
# merged into $OUT/gpu_check.json the moment it is measured, so a step cut off still leaves the
# figures before it and a note naming what was cut; a failed step never stops the next ones
# (train needs setup + cache). Logs: $OUT/<step>.log (the last 4 MB of each kept).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DRV=$HERE/_gpu_check.py
MODE=gpu
DRY=0
for arg in "$@"; do
  case "$arg" in
    --smoke) MODE=smoke ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $arg (--smoke, --dry-run, --help)" >&2; exit 2 ;;
  esac
done
if [[ $MODE == smoke ]]; then BUDGET_S=${BUDGET_S:-240}; else BUDGET_S=${BUDGET_S:-470}; fi
# per-step caps (s); each step also stops where the budget ends
declare -A CAP=([install]=330 [env]=60 [setup]=150 [regen]=200 [cache]=150 [train]=240 [engines]=180)
for kv in ${GPU_CHECK_CAPS:-}; do CAP[${kv%%=*}]=${kv#*=}; done  # e.g. GPU_CHECK_CAPS="regen=5" (tests)
# regen right after setup: it needs only the teacher; engines last: two more teacher loads, vLLM's compiled
ALL_STEPS=(env setup regen cache train engines)
STEPS=()
for s in "${ALL_STEPS[@]}"; do
  [[ -z ${GPU_CHECK_STEPS:-} || " $GPU_CHECK_STEPS " == *" $s "* ]] && STEPS+=("$s")
done
for s in ${GPU_CHECK_STEPS:-}; do
  [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "gpu_check.sh: GPU_CHECK_STEPS: no step $s (${ALL_STEPS[*]})" >&2; exit 2; }
done
want() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

if (( DRY )); then
  echo "gpu_check.sh plan: mode=$MODE budget=${BUDGET_S}s out=${OUT:-<temp folder>}"
  [[ $MODE == gpu && -z ${PYTHON:-} ]] && echo "  install: .ci/setup-venv.sh in a venv when PyPI answers (cap ${CAP[install]}s), else python3 + \$WHEELS"
  for s in "${STEPS[@]}"; do echo "  $s: python $DRV $s --mode $MODE (cap ${CAP[$s]}s)"; done
  exit 0
fi

T0=$SECONDS
KEEP_WORK=${GPU_CHECK_WORK:+1}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/llavadi-gpu-check.XXXXXX")}
mkdir -p "$WORK"
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
JSON=$OUT/gpu_check.json
rm -f "$JSON"
# llavadi importable as `llavadi` from this checkout, whatever interpreter runs it
mkdir -p "$WORK/path"
ln -sfn "$REPO" "$WORK/path/llavadi"
export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=30

note() { python3 "$DRV" note "$1" --out "$JSON" 2>/dev/null || echo "[gpu-check] note: $1" >&2; }

finish() {
  local rc=$?
  python3 - "$JSON" "$(( SECONDS - T0 ))" "$BUDGET_S" "$MODE" <<'PY' || true
import json, os, sys
p, total, budget, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
d = json.load(open(p)) if os.path.exists(p) else {}
d.update(total_s=total, budget_s=budget, mode=mode)
open(p + ".tmp", "w").write(json.dumps(d, indent=1, sort_keys=True) + "\n")
os.replace(p + ".tmp", p)
print(json.dumps(d, sort_keys=True))
PY
  for f in "$OUT"/*.log; do
    [[ -f $f ]] && (( $(stat -c %s "$f") > 4194304 )) && { tail -c 4194304 "$f" > "$f.tail"; mv "$f.tail" "$f"; }
  done
  [[ -z $KEEP_WORK ]] && rm -rf "$WORK/run" "$WORK/regen" "$WORK/teacher" "$WORK/student" "$WORK/venv" "$WORK/site"
  echo "[gpu-check] done in $(( SECONDS - T0 ))s: $JSON" >&2
  return $rc
}
trap finish EXIT

run_step() {  # NAME CMD...: under a timeout that fits the budget, output to $OUT/NAME.log; 0 = ok
  local name=$1; shift
  local left=$(( BUDGET_S - (SECONDS - T0) - 10 ))
  if (( left < 20 )); then note "$name: skipped, the ${BUDGET_S} s budget is spent"; return 1; fi
  local t=$(( ${CAP[$name]} < left ? ${CAP[$name]} : left ))
  echo "[gpu-check] $name (timeout ${t}s, $(( SECONDS - T0 ))s so far)" >&2
  local rc=0
  timeout -k 10 "$t" "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  if (( rc == 124 || rc == 137 )); then
    note "$name: cut off by its ${t} s timeout (figures measured before it are kept; see $name.log)"
  elif (( rc != 0 )); then
    note "$name: exited $rc (see $name.log): $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ' | cut -c1-400)"
  fi
  return $rc
}

# ------------------------------------------------------------------ interpreter
if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON
elif [[ $MODE == smoke ]]; then
  PY=$REPO/.venv/bin/python; [[ -x $PY ]] || PY=python3
else
  PY=python3
  if timeout 20 python3 -c "import urllib.request as u; u.urlopen('https://pypi.org/simple/vllm/', timeout=10)" >/dev/null 2>&1; then
    # the Makefile's GPU path: CUDA vllm (with its torch) + requirements + llavadi, in a fresh venv
    if run_step install bash -c 'cd "$0" && bash .ci/setup-venv.sh "$1"' "$REPO" "$WORK/venv"; then
      PY=$WORK/venv/bin/python
    else
      note "install: .ci/setup-venv.sh failed; falling back to the machine's python3 (no vLLM unless it has one)"
    fi
  else
    note "install: PyPI is not reachable from this machine; using its python3 + \$WHEELS; vLLM only if already installed"
  fi
  if [[ $PY == python3 ]]; then
    WHEELS=${WHEELS:-$REPO/.whl}
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl \
        >>"$OUT/install.log" 2>&1 || note "install: wheels from $WHEELS failed (see install.log)"
      export PYTHONPATH="$PYTHONPATH:$WORK/site"
    fi
    missing=$(python3 -c "
import importlib.util as u
print(' '.join(m for m in ('zarr','numcodecs','webdataset','ijson','wordllama','typer','pyarrow','transformers','torch') if u.find_spec(m) is None))")
    [[ -n $missing ]] && note "install: python3 lacks $missing (carry their wheels in \$WHEELS): the steps that need them fail"
  fi
fi
echo "[gpu-check] mode=$MODE python=$PY work=$WORK out=$OUT" >&2

# ------------------------------------------------------------------ steps
ARGS=(--mode "$MODE" --work "$WORK" --out "$JSON")
want env && { run_step env "$PY" "$DRV" env "${ARGS[@]}" || true; }
if want setup && ! run_step setup "$PY" "$DRV" setup "${ARGS[@]}"; then
  note "setup failed: no teacher or data, nothing else can run"
  exit 1
fi
want regen && { run_step regen "$PY" "$DRV" regen "${ARGS[@]}" || true; }
if want cache; then
  if run_step cache "$PY" "$DRV" cache "${ARGS[@]}"; then
    want train && { run_step train "$PY" "$DRV" train "${ARGS[@]}" || true; }
  else
    want train && note "train: not run (it trains from the cache the cache step writes)"
  fi
elif want train; then
  run_step train "$PY" "$DRV" train "${ARGS[@]}" || true  # a cache from an earlier run in GPU_CHECK_WORK
fi
want engines && { run_step engines "$PY" "$DRV" engines "${ARGS[@]}" || true; }
