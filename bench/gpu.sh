#!/usr/bin/env bash
# GPU throughput of ResNet-110: naive loop, Ablate's fast path, fused seeds k=4 and 8, and the projected
# GPU-hours of the paper's Table 2 (bench/gpu.py says what each variant is). On a machine with several GPUs,
# first one trial split over one rank per GPU against the same global batch on one GPU (bench/workers.py).
# One script for a fresh GPU machine that reaches no network, run from a copy of this repository; about 8
# minutes at most.
#
#   bash bench/gpu.sh                          # on the GPU machine, from the repository root
#   PIP_NO_INDEX=1 bash bench/gpu.sh --quick --device cpu   # the same steps as a smoke run, anywhere
#
# Setup (printed as it goes): a fresh venv that also sees the machine's own packages; torch 2.14.1 and
# torchvision 0.29.1 installed from a local wheel folder or pip's configured cache when they are there,
# else the machine's own torch is used; then the few modules the bench imports (pydantic, numpy, PyYAML)
# where missing, and Ablate itself (`pip install -e . --no-deps`).
# The NVIDIA image of this workplace has torch, torchvision, numpy and PyYAML but not pydantic: carry its
# wheels in `.whl/` (ignored by git), made beforehand on a machine with PyPI:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# Knobs: PYTHON (base interpreter, default python3), VENV (default /tmp/ablate-bench-venv), WHEELS (default
# .whl), TOTAL (seconds for everything, default 470). Arguments go to bench/gpu.py. The last line of the
# output is bench/gpu.py's key=value line (`ratio=` best fused seed-image throughput over naive).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/ablate-bench-venv}
WHEELS=${WHEELS:-.whl}
TOTAL=${TOTAL:-470}

"$PYTHON" -m venv --system-site-packages "$VENV" || { echo "cannot create a venv with $PYTHON"; exit 1; }
PY="$VENV/bin/python"
FIND=()
[ -d "$WHEELS" ] && FIND=(--find-links "$WHEELS")
# No index is reachable there: fail fast instead of retrying for minutes.
offline_pip() {
  timeout 60 "$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 5 "${FIND[@]}" "$@"
}

if offline_pip torch==2.14.1 torchvision==0.29.1 >/tmp/ablate-bench-pip.log 2>&1; then
  echo "setup: torch 2.14.1 and torchvision 0.29.1 already there or installed from local wheels"
else
  echo "setup: torch 2.14.1 not installable here ($(tail -n 1 /tmp/ablate-bench-pip.log)); using the machine's own"
fi
"$PY" -c "import torch, torchvision; print(f'setup: torch {torch.__version__} (CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}) from {torch.__file__}; torchvision {torchvision.__version__}')" \
  || { echo "setup: no importable torch and torchvision: nothing to measure"; exit 1; }

for pair in pydantic:pydantic numpy:numpy yaml:PyYAML; do
  module=${pair%%:*} package=${pair#*:}
  "$PY" -c "import $module" 2>/dev/null && continue
  if offline_pip "$package" >/tmp/ablate-bench-pip.log 2>&1; then
    echo "setup: installed $package"
  else
    echo "setup: $package missing and not installable offline: carry its wheels in $WHEELS (see the top of this file)"
    exit 1
  fi
done
"$PY" -c "import pydantic, numpy, yaml; print(f'setup: pydantic {pydantic.VERSION}, numpy {numpy.__version__}, PyYAML {yaml.__version__}')"
# Ablate itself, no dependencies (the bench needs none of the service's); setuptools from the venv's view
# of the machine, since no build isolation can download one. bench/gpu.py also finds the repository alone.
if offline_pip --no-deps --no-build-isolation -e . >/tmp/ablate-bench-pip.log 2>&1; then
  echo "setup: installed ablate (editable, no dependencies)"
else
  echo "setup: editable install failed ($(tail -n 1 /tmp/ablate-bench-pip.log)); running from the repository root"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# Several GPUs: ResNet-110 at 64 images per GPU (the paper's per-GPU batch on CIFAR) split over one rank per
# GPU (DistributedDataParallel over NCCL, BN per GPU), against the same global batch on one GPU. Eager, so no
# compile time; at most a third of the time left, and the single-GPU bench below still runs.
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${GPUS:-0}" -ge 2 ]; then
  BUDGET=$(( (TOTAL - (SECONDS - START)) / 3 ))
  echo "multi-GPU: ResNet-110, global batch $((64 * GPUS)) on 1 GPU and on $GPUS ranks, at most $BUDGET s"
  PYTHONUNBUFFERED=1 timeout "$BUDGET" "$PY" bench/workers.py --device cuda --workers "$GPUS" --depth 110 \
    --batch $((64 * GPUS)) --threads "$(nproc)" || echo "multi-GPU: no result within $BUDGET s"
fi

LEFT=$((TOTAL - (SECONDS - START) - 25))  # 25 s for the report and the processes to exit
echo "setup took $((SECONDS - START)) s; measuring for at most $LEFT s"
PYTHONUNBUFFERED=1 exec "$PY" bench/gpu.py --deadline "$LEFT" "$@"
