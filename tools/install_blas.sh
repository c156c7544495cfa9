#!/usr/bin/env bash
# Make an optimised BLAS available to MLX on Linux (reap_stream.blas loads it before mlx).
# Idempotent: does nothing when OpenBLAS (or MKL) is already there; installs Debian/Ubuntu's
# libopenblas0-pthread with apt-get when run as root and it is missing; says what it did.
#   tools/install_blas.sh           install when missing (root + apt-get), else explain
#   tools/install_blas.sh --check   only report: exit 0 when found, 1 when missing
set -euo pipefail

PACKAGE=libopenblas0-pthread
PYTHON=${PYTHON:-python3}

if [ "$(uname -s)" != "Linux" ]; then
    echo "install_blas: $(uname -s): nothing to do (MLX uses the platform's BLAS)"
    exit 0
fi

find_blas() {
    # the same search reap_stream.blas does, without importing mlx
    "$PYTHON" - <<'EOF' 2>/dev/null || true
import ctypes.util, glob, platform, sys
arch = f"{platform.machine()}-linux-gnu"
dirs = [f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/usr/lib", "/usr/local/lib", "/opt/OpenBLAS/lib"]
names = ["openblas-pthread/libblas.so.3", "openblas-pthread/libopenblas.so.0", "libopenblas.so.0",
         "openblas-openmp/libblas.so.3", "openblas-openmp/libopenblas.so.0", "libopenblasp-r*.so", "libopenblas.so"]
hits = [p for d in dirs for n in names for p in sorted(glob.glob(f"{d}/{n}"))]
hits += sorted(glob.glob(f"{sys.prefix}/lib/libmkl_rt.so*"))
lib = ctypes.util.find_library("openblas") or ctypes.util.find_library("mkl_rt")
print(hits[0] if hits else (lib or ""))
EOF
}

found=$(find_blas)
if [ -n "$found" ]; then
    echo "install_blas: found $found (nothing to do)"
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    echo "install_blas: missing (install with: apt-get install $PACKAGE)"
    exit 1
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
    echo "install_blas: no optimised BLAS; as root run: apt-get install $PACKAGE (or pip install mkl)"
    exit 1
fi
echo "install_blas: installing $PACKAGE with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$PACKAGE" >/dev/null
found=$(find_blas)
if [ -z "$found" ]; then
    echo "install_blas: $PACKAGE installed but no library found" >&2
    exit 1
fi
echo "install_blas: installed $found"
