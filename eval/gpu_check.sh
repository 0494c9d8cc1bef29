#!/usr/bin/env bash
# The GPU check: one script for one H100 / H200 with PyTorch and CUDA, under 10 minutes (every part has its own
# time limit). Nothing is downloaded.
#   KERNELS=path/to/gpu-kernels BEFORE=path/to/an/older/checkout OUT=results bash eval/gpu_check.sh
# KERNELS (optional): a folder with setup.sh that installs prebuilt mamba-ssm and causal-conv1d (without them the
#   kernel tests skip, naming what is missing, and the peer runs transformers' PyTorch path).
# BEFORE (optional): an older lily-ssm checkout whose training step is profiled too, for a before/after table.
# 1. lily-ssm env; 2. eval/bench/gpu_step.py --profile --decode (training and decoding against the fused peer, the
# projected epoch); 3. with BEFORE, the same training arms on the older code; 4. eval/bench/falcon_dt_norm.py (does
# stock transformers train the function it evaluates?); 5. pytest -m cuda tests/test_cuda.py tests/test_hybrids.py
# (the hybrids' kernel paths, where flash-linear-attention and causal-conv1d import), in the time left of
# BUDGET seconds (default 580).
# Results in $OUT (default gpu-check): env.txt, pytest_cuda.txt, falcon_dt_norm.txt, step/gpu_step.{json,md},
# before/gpu_step.{json,md}, kernels.txt. Exits non-zero if a part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
begin=$SECONDS
part() { echo; echo "== $1 (at $((SECONDS - begin)) s)"; }

if [[ -n "${KERNELS:-}" ]]; then
    part "installing the kernels from $KERNELS"
    # shellcheck disable=SC1091
    source "$KERNELS/setup.sh" /tmp/lily-ssm-kernels > "$OUT/kernels.txt" 2>&1 || status=1
    tail -n 3 "$OUT/kernels.txt"
fi

left() { echo $(( ${BUDGET:-580} - (SECONDS - begin) )); }  # what is left of the whole check's time

part "lily-ssm env"
timeout 60 "$PY" -m lily_ssm.cli env 2>&1 | tee "$OUT/env.txt" || status=1

part "training and decoding against the fused peer"
timeout 270 "$PY" eval/bench/gpu_step.py --out "$OUT/step" --profile --decode || status=1

if [[ -n "${BEFORE:-}" ]]; then
    part "the training step on the older code in $BEFORE"
    PYTHONPATH="$BEFORE:$PYTHONPATH" timeout 90 "$PY" eval/bench/gpu_step.py --out "$OUT/before" --profile \
        --arms lily-in,lily-dt-in,lora-in --no-projection || status=1
fi

part "Falcon-Mamba: the function trained and the function evaluated"
timeout 60 "$PY" eval/bench/falcon_dt_norm.py 2>&1 | tee "$OUT/falcon_dt_norm.txt" || status=1

part "pytest -m cuda (within the $(left) s left)"
timeout "$(left)" "$PY" -m pytest -m cuda -q -rs --durations=8 -p no:cacheprovider tests/test_cuda.py \
    tests/test_hybrids.py 2>&1 | tee "$OUT/pytest_cuda.txt" || status=1
part "done, status $status"
exit $status
