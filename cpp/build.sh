#!/usr/bin/env bash
# Fetch the dependencies (deps.sh) and build cpp/build (-O2). With --sanitize, also
# cpp/build-asan (AddressSanitizer + UndefinedBehaviorSanitizer). Usage: cpp/build.sh [--sanitize]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/deps.sh"
if ! command -v cmake >/dev/null 2>&1; then  # deps.sh pip-installed it: the Python's scripts folder
  PATH="$("${PYTHON:-python3}" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
fi
jobs="$(nproc 2>/dev/null || echo 2)"
cmake -S "$here" -B "$here/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$here/build" -j "$jobs"
if [[ "${1:-}" == "--sanitize" ]]; then
  cmake -S "$here" -B "$here/build-asan" -DCMAKE_BUILD_TYPE=Debug -DV2T_SANITIZE=ON >/dev/null
  cmake --build "$here/build-asan" -j "$jobs"
fi
