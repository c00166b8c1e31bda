#!/usr/bin/env bash
# Fetch what the C++ build needs into cpp/deps/, from package registries only:
#   - ONNX Runtime's C/C++ headers: Debian's libonnxruntime-dev (trixie; bookworm has none), by
#     `apt-get download` with a private package list, unpacked with `dpkg -x`. Nothing is installed.
#   - ONNX Runtime's shared library: the one in the onnxruntime wheel (the Python package's, or,
#     with no onnxruntime installed, a `pip download`ed wheel). Headers of an older ORT work with
#     a newer library: the C API is versioned (OrtGetApiBase()->GetApi(ORT_API_VERSION)).
#   - nlohmann/json (header-only): Debian's nlohmann-json3-dev, the same way.
#   - libjpeg-turbo and libpng: the system's development packages (apt-get install as root when
#     missing), and cmake (pip install cmake when missing).
# Idempotent: a second run only checks. Usage: cpp/deps.sh [--force]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deps="$here/deps"
[[ "${1:-}" == "--force" ]] && rm -rf "$deps"
mkdir -p "$deps/lib" "$deps/pkgs"
python="${PYTHON:-python3}"

need_cmd_or_pip() {  # cmake from PyPI when the system has none
  if ! command -v cmake >/dev/null 2>&1; then
    echo "deps.sh: no cmake; pip install cmake" >&2
    "$python" -m pip install -q cmake
  fi
}

system_dev_packages() {  # libjpeg-turbo, libpng and a C++ compiler from Debian
  local missing=()
  [[ -f /usr/include/jpeglib.h || -f /usr/include/x86_64-linux-gnu/jpeglib.h ]] || missing+=(libjpeg62-turbo-dev)
  [[ -f /usr/include/png.h ]] || missing+=(libpng-dev)
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  ((${#missing[@]} == 0)) && return 0
  if [[ "$(id -u)" != 0 ]]; then
    echo "deps.sh: missing ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "deps.sh: apt-get install ${missing[*]}" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

debian_headers() {  # libonnxruntime-dev and nlohmann-json3-dev, unpacked, not installed
  [[ -f "$deps/root/usr/include/onnxruntime/onnxruntime_cxx_api.h" &&
     -f "$deps/root/usr/include/nlohmann/json.hpp" ]] && return 0
  local apt="$deps/apt"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    > "$apt/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1)
  [[ "$(id -u)" == 0 ]] && opts+=(-o APT::Sandbox::User=root)  # files under cpp/deps, not apt's own
  apt-get "${opts[@]}" -q update >/dev/null
  (cd "$deps/pkgs" && apt-get "${opts[@]}" -q download libonnxruntime-dev nlohmann-json3-dev >/dev/null)
  for deb in "$deps"/pkgs/*.deb; do dpkg -x "$deb" "$deps/root"; done
  rm -rf "$apt"  # the package lists are 20 MB; the headers are all we keep
}

ort_library() {  # the wheel's libonnxruntime.so.1.x as deps/lib/libonnxruntime.so.1 (its SONAME)
  [[ -f "$deps/lib/libonnxruntime.so.1" ]] && return 0
  local capi
  capi="$("$python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))' 2>/dev/null || true)"
  if [[ -z "$capi" ]]; then
    echo "deps.sh: onnxruntime is not installed in $python; pip download onnxruntime" >&2
    "$python" -m pip download -q --no-deps --only-binary=:all: -d "$deps/pkgs" onnxruntime
    (cd "$deps/pkgs" && "$python" -m zipfile -e onnxruntime-*.whl wheel)
    capi="$deps/pkgs/wheel/onnxruntime/capi"
  fi
  local lib
  lib="$(ls "$capi"/libonnxruntime.so.1.* | head -n1)"
  cp "$lib" "$deps/lib/libonnxruntime.so.1"
  ln -sf libonnxruntime.so.1 "$deps/lib/libonnxruntime.so"
  rm -rf "$deps/pkgs/wheel"
}

need_cmd_or_pip
system_dev_packages
debian_headers
ort_library
echo "deps.sh: ready in $deps" >&2
