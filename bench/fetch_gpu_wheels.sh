#!/usr/bin/env bash
# Download the wheels of bench/gpu-wheels.txt into .whl/ (ignored by git,
# carried with the working tree to the GPU machine, which reaches no package
# registry). Binary wheels for CPython 3.12 on manylinux x86_64 (the GPU
# machine) and for this machine's Python (the dry run installs the same set
# here). Reproducible: exact versions, --no-deps (every dependency is listed).
#
#   bash bench/fetch_gpu_wheels.sh            # into .whl/
#   WHEELS=/some/dir bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
WHEELS="${WHEELS:-.whl}"
mkdir -p "$WHEELS"
mapfile -t REQS < <(grep -Ev '^\s*(#|$)' bench/gpu-wheels.txt)
LOCAL_VERSION="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
for version in $(printf '%s\n' 3.12 "$LOCAL_VERSION" | sort -u); do
  echo "== wheels for CPython $version"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${REQS[@]}"
done
ls -1 "$WHEELS" | wc -l | xargs echo "wheels in $WHEELS:"
du -sh "$WHEELS"
