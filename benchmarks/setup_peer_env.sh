#!/usr/bin/env bash
# Create the separate virtual environment that benchmarks/peers.py runs in.
#
# The peers (steering-vectors, repeng) need transformers < 5, which cannot live next to sadi-peft's transformers 5,
# so they get their own venv OUTSIDE the repository (default /tmp/sadi-peer-venv; override with PEER_VENV=...).
# torch is installed FIRST, pinned to the same CPU build as .venv (torch==2.13.0), so that pip never resolves
# "torch" to a multi-GB CUDA build while installing the peers.
#
#   bash benchmarks/setup_peer_env.sh            # create / update /tmp/sadi-peer-venv
#   /tmp/sadi-peer-venv/bin/python benchmarks/peers.py --model-path "$(.venv/bin/python -c \
#       'from sadi_peft.zoo import resolve_model_path; print(resolve_model_path())')"
set -euo pipefail

PEER_VENV="${PEER_VENV:-/tmp/sadi-peer-venv}"
PYTHON_BOOTSTRAP="${PYTHON_BOOTSTRAP:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers==4.57.6}"

if [ ! -x "$PEER_VENV/bin/python" ]; then
    "$PYTHON_BOOTSTRAP" -m venv "$PEER_VENV"
fi
PIP=("$PEER_VENV/bin/python" -m pip)
if ! "$PEER_VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "Installing $TORCH_SPEC (CPU wheel) first"
    "${PIP[@]}" install "$TORCH_SPEC"
fi
# Keep torch where it is: the constraint file stops any peer from upgrading it (or pulling a CUDA build).
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PEER_VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
"${PIP[@]}" install -c "$constraints" "$TRANSFORMERS_SPEC" steering-vectors repeng
"$PEER_VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for name in ("torch", "transformers", "steering-vectors", "repeng"):
    print(f"{name}=={md.version(name)}")
EOF
