#!/usr/bin/env bash
# Puts the demo's real scans into DEST (default data/demo), from package registries only:
#   - Debian's mricron-data (BSD-3): the Colin27 head T1 ch2.nii.gz and its brain-extracted ch2bet.nii.gz;
#   - nilearn's wheel from PyPI (BSD-3): the MNI152 2009a T1 template and its grey- and white-matter maps.
# Nothing is installed system-wide: the .deb is downloaded with `apt-get download` and unpacked with dpkg-deb, the
# wheel with `pip download` and unzip. Without apt (not a Debian/Ubuntu machine) only the nilearn data is fetched,
# and this script says so: the demo then has no head scan with a skull to segment.
set -euo pipefail
dest=${1:-data/demo}
python=$(command -v "${PYTHON:-python3}")
python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")
nilearn_version=${TRTSEG_NILEARN_VERSION:-0.14.1}
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$dest/ch2.nii.gz" ] || [ ! -f "$dest/ch2bet.nii.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && (cd "$tmp" && apt-get download -q mricron-data >/dev/null 2>&1); then
    dpkg-deb -x "$tmp"/mricron-data_*.deb "$tmp/deb"
    cp "$tmp/deb/usr/share/mricron/templates/ch2.nii.gz" "$tmp/deb/usr/share/mricron/templates/ch2bet.nii.gz" "$dest/"
    cp "$tmp/deb/usr/share/doc/mricron-data/copyright" "$dest/mricron-data.copyright" 2>/dev/null || true
    echo "demo data: Colin27 (ch2, ch2bet) from Debian's mricron-data"
  else
    echo "demo data: apt is not available here; Debian's mricron-data (Colin27) cannot be fetched, so the demo" \
         "falls back to nilearn's MNI152 template only (pip), which has no skull and no independent reference" >&2
  fi
fi

mni=mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz
if [ ! -f "$dest/$mni" ]; then
  "$python" -m pip download -q --no-deps "nilearn==$nilearn_version" -d "$tmp/whl" 2>&1 | grep -v "is ignored" >&2 || true
  (cd "$tmp" && "$python" -m zipfile -e whl/nilearn-*.whl nl >/dev/null)
  for part in t1 gm wm; do
    cp "$tmp/nl/nilearn/datasets/data/mni_icbm152_${part}_tal_nlin_sym_09a_converted.nii.gz" "$dest/"
  done
  echo "demo data: MNI152 2009a T1, grey- and white-matter maps from nilearn $nilearn_version (PyPI)"
fi
