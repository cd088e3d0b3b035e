#!/usr/bin/env bash
# Installs tensorrt-stubs (type stubs of TensorRT's Python API) into VENV/typestubs, for mypy only.
# They go to their own folder, not site-packages: the stubs create a `tensorrt` package of .pyi files, which would
# make `import tensorrt` succeed on machines without TensorRT. --no-deps: the stubs' metadata requires the real
# tensorrt, which downloads its libraries from a host outside PyPI.
# tensorrt-stubs 10.13.0.35.1 has two syntax errors that stop mypy: parameters named `in` (a keyword) and a
# parameter without default after ones with defaults (add_scale_nd); both are patched here.
set -euo pipefail
venv=${1:-.venv}
dest="$venv/typestubs"
rm -rf "$dest"
"$venv/bin/python" -m pip install -q --no-deps --target "$dest" "tensorrt-stubs==10.13.0.35.1"
pyi="$dest/tensorrt_bindings/tensorrt.pyi"
sed -i -E '/^\s*def /s/([(,] ?)in: /\1in_: /g' "$pyi"
sed -i -E 's/(def add_scale_nd\(.*), channel_axis: int\)/\1, channel_axis: int = ...)/' "$pyi"
