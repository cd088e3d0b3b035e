#!/usr/bin/env bash
# Creates the virtual environment VENV (default .venv) with trtseg and its test tools.
#
# torch: a torch that is already importable in VENV is kept (a CUDA build on GPU machines, or the one an NGC image
# ships). Otherwise machines with an NVIDIA GPU get PyPI's default (CUDA) build, and machines without one get the
# CPU build: TRTSEG_CPU_TORCH (default torch==2.13.0) from
# TRTSEG_TORCH_INDEX when set (e.g. https://download.pytorch.org/whl/cpu elsewhere).
# TRTSEG_EXTRAS (default test) picks the extras: container images take s3,gcs,demo,formats,dicom.
# The installed torch version is then pinned as a constraint, so that no other package (timm via
# dynamic-network-architectures, for instance) can swap it for another build.
set -euo pipefail
venv=${1:-.venv}
extras=${TRTSEG_EXTRAS:-test}
# TRTSEG_VENV_ARGS=--system-site-packages lets the venv see an image's own torch and TensorRT (cluster/image/)
[ -x "$venv/bin/python" ] || python3 -m venv ${TRTSEG_VENV_ARGS:-} "$venv"
pip=("$venv/bin/python" -m pip)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install -q "torch>=2.4"
  else
    "${pip[@]}" install -q "${TRTSEG_CPU_TORCH:-torch==2.13.0}" ${TRTSEG_TORCH_INDEX:+--index-url "$TRTSEG_TORCH_INDEX"}
  fi
fi
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$venv/torch-constraint.txt"
"${pip[@]}" install -q -c "$venv/torch-constraint.txt" -e ".[${extras}]"
case ",$extras," in *,test,*) bash "$(dirname "$0")/typestubs.sh" "$venv" ;; esac  # for mypy in the tests
# dciodvfy (Debian's dicom3tools) validates the DICOM Segmentations tests/test_dicom.py writes; without it (no
# apt-get, or not root) that check is skipped with a warning
case ",$extras," in *,test,*)
  if ! command -v dciodvfy >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools; }; } >/dev/null 2>&1 ||
      echo "dicom3tools could not be installed: the tests will not validate DICOM output with dciodvfy"
  fi ;;
esac
"$venv/bin/python" -c "import torch, trtseg; print('trtseg installed with torch', torch.__version__)"
