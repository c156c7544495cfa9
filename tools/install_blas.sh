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

REPO=$(cd "$(dirname "$0")/.." && pwd)

find_blas() {
    # reap_stream.blas's own search (stdlib only, importable before the package is installed)
    PYTHONPATH="$REPO" "$PYTHON" -c '
from reap_stream.blas import mkl_candidates, openblas_candidates
hits = openblas_candidates() + mkl_candidates()
print(hits[0] if hits else "")' 2>/dev/null || true
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
