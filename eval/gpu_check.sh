#!/usr/bin/env bash
# The GPU check, one script for one H100 / H200 with PyTorch and CUDA (mamba-ssm and causal-conv1d may be
# absent; nothing is installed, no network is needed). About 3 minutes; every part has its own time limit
# and the whole stays under 8, so it can run twice within 15 minutes.
#   bash eval/gpu_check.sh            (results in $OUT, else ./gpu-check)
# 1. pytest -m cuda tests/test_cuda.py: the kernel tests skip, naming what is missing, without the kernels;
#    the tests of lily-ssm's PyTorch path on CUDA tensors (and of the fused core's memory) run either way.
# 2. eval/bench/gpu_step.py: train-step tokens/s and peak CUDA memory of a 4-layer Falcon-Mamba at the 7B
#    width for our Lily on in_proj, our Lily on in_proj + dt_proj, and PEFT's Lily on stock transformers.
# It writes pytest_cuda.txt, gpu_step.txt, gpu_step.json and gpu_step.md, and exits non-zero if a part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0

echo "== environment"
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/environment.txt"
import importlib, torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("transformers", "peft", "accelerate", "safetensors", "mamba_ssm", "causal_conv1d"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__})")
PYEOF

echo "== pytest -m cuda"
timeout 300 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.txt" \
    || status=1

echo "== train-step timings"
timeout 240 "$PY" eval/bench/gpu_step.py --out "$OUT" 2>&1 | tee "$OUT/gpu_step.txt" || status=1

exit $status
