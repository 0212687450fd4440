#!/usr/bin/env bash
# Creates .venv and installs Previz with its test tools on a fresh machine. Idempotent: a venv whose
# stamp matches pyproject.toml is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.previz-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi

echo "previz setup: creating $VENV and installing torch, Ray, diffusers and the test tools." >&2
echo "previz setup: the first run downloads about 5 GB (PyPI's torch is a CUDA build); minutes on a slow link." >&2
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip

# torch first, so nothing else drags in a different build. spandrel (the SR loader) needs torchvision,
# and PyPI's torchvision only imports beside the matching torch release, so the pair is pinned:
# on x86_64 torch 2.14.1 + torchvision 0.29.1 (the CPU-only torch 2.13.0 wheel has no torchvision
# that imports beside it), on aarch64 the CPU build pair 2.9.1 + 0.24.1.
case "$(uname -m)" in
  aarch64|arm64) torch_pins=("torch==2.9.1" "torchvision==0.24.1") ;;
  *) torch_pins=("torch==2.14.1" "torchvision==0.29.1") ;;
esac
echo "previz setup: 1/2 ${torch_pins[*]} (the largest download) …" >&2
"$VENV/bin/python" -m pip install --quiet "${torch_pins[@]}"
echo "previz setup: 2/2 the project and its test tools …" >&2
"$VENV/bin/python" -m pip install --quiet "${torch_pins[@]}" -e ".[dev]"
echo "previz setup: done ($VENV)" >&2

rm -f "$VENV"/.previz-setup-*
touch "$stamp"
