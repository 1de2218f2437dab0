#!/usr/bin/env bash
# build-wheelhouse.sh - courier's wheel and every runtime dependency as wheels, for the image.
#
# The AMI installs courier with `pip install --no-index --find-links WHEELHOUSE courier`
# (packer/scripts/provision.sh): the image build never reaches PyPI, and what it installs
# is exactly what this script resolved, pinned by constraints.txt. Dependencies are
# binary wheels for the target, not for this machine: CPython 3.11 (Debian 12's python3,
# Amazon Linux 2023's python3.11), manylinux with glibc <= 2.34, x86_64 by default.
# Development dependencies (the [dev] extra) are not included.
#
# Usage: scripts/build-wheelhouse.sh [OUTPUT_DIR]      (default: dist/wheelhouse)
# Environment: PYTHON (default python3), WHEEL_ARCH (x86_64 or aarch64),
#              WHEEL_PYTHON_VERSION (3.11), WHEEL_GLIBC (2_34).
set -euo pipefail

cd "$(dirname "$0")/.."
out=${1:-dist/wheelhouse}
python=${PYTHON:-python3}
arch=${WHEEL_ARCH:-x86_64}
pyver=${WHEEL_PYTHON_VERSION:-3.11}
glibc=${WHEEL_GLIBC:-2_34}
abi=cp${pyver/./}

# pip matches --platform tags literally: list every manylinux tag up to the target's glibc.
platforms=()
for ((minor = ${glibc#2_}; minor >= 5; minor--)); do
  platforms+=(--platform "manylinux_2_${minor}_${arch}")
done
platforms+=(--platform "manylinux2014_${arch}")
[[ $arch != x86_64 ]] || platforms+=(--platform manylinux2010_x86_64 --platform manylinux1_x86_64)

rm -rf "$out"
mkdir -p "$out"

# courier itself: a pure-Python wheel from this work tree.
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$out" .
wheel=$(find "$out" -maxdepth 1 -name 'courier-*.whl' -print -quit)
[[ -n $wheel ]] || {
  echo "build-wheelhouse: no courier wheel was built" >&2
  exit 1
}
version=$(basename "$wheel" | cut -d- -f2)

# Its runtime dependencies, resolved for the target platform, binary only: nothing is
# compiled on this machine or on the image.
"$python" -m pip download --quiet --disable-pip-version-check \
  --dest "$out" --find-links "$out" \
  --constraint constraints.txt \
  --only-binary=:all: \
  --implementation cp --python-version "$pyver" --abi "$abi" \
  "${platforms[@]}" \
  "courier==$version"

# A manifest, so that the image build can be traced to exact versions.
(cd "$out" && sha256sum -- *.whl >SHA256SUMS)
echo "build-wheelhouse: $(find "$out" -name '*.whl' | wc -l) wheels for CPython $pyver, manylinux_${glibc}_${arch} in $out" >&2
