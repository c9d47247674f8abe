#!/usr/bin/env bash
# Build the C++ edge apps (kdq-classify-torch, kdq-classify-ort) into BUILD_DIR (default: build/edge-cpp).
#
#   deploy/edge/cpp/build.sh [BUILD_DIR]
#
# Needs cmake and g++ (apt-get install cmake g++). Everything else comes from the package registries:
#   libtorch      the torch wheel of $PYTHON (default .venv/bin/python): torch.utils.cmake_prefix_path
#   ONNX Runtime  library: the onnxruntime wheel of $ORT_PYTHON (default $PYTHON), onnxruntime/capi/;
#                 C/C++ headers: $ONNXRUNTIME_INCLUDE_DIR, or else Debian's libonnxruntime-dev package
#                 ($ORT_DEB_SUITE, default trixie), downloaded with apt-get into BUILD_DIR/deps without
#                 installing it or touching the system's apt sources. The headers may be older than the
#                 library (the C API is versioned), never newer.
# Set KDQ_EDGE_ORT=OFF to build only the libtorch app. Re-running only rebuilds what changed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../../.." && pwd)
build=${1:-$root/build/edge-cpp}
PYTHON=${PYTHON:-$root/.venv/bin/python}
ORT_PYTHON=${ORT_PYTHON:-$PYTHON}
ORT_DEB_SUITE=${ORT_DEB_SUITE:-trixie}
KDQ_EDGE_ORT=${KDQ_EDGE_ORT:-ON}
JOBS=${JOBS:-2}

die() { echo "build.sh: $*" >&2; exit 1; }
command -v cmake >/dev/null || die "cmake not found: apt-get install cmake g++"
command -v c++ >/dev/null || die "no C++ compiler: apt-get install g++"
mkdir -p "$build"

# torch.utils.cmake_prefix_path and onnxruntime's folder, found without importing them (seconds faster).
package_dir() {
  "$1" -c "import importlib.util as u; print(u.find_spec('$2').submodule_search_locations[0])" 2>/dev/null
}
torch_dir=$(package_dir "$PYTHON" torch) || die "$PYTHON has no torch; set PYTHON to a Python with torch installed"
torch_prefix="$torch_dir/share/cmake"

ort_args=(-DKDQ_EDGE_ORT=OFF)
if [[ $KDQ_EDGE_ORT == ON ]]; then
  ort_dir=$(package_dir "$ORT_PYTHON" onnxruntime) || die "$ORT_PYTHON has no onnxruntime; set ORT_PYTHON"
  ort_lib=$(find "$ort_dir/capi" -maxdepth 1 -name 'libonnxruntime.so.1*' | sort | tail -n 1)
  [[ -n $ort_lib ]] || die "the onnxruntime wheel of $ORT_PYTHON has no capi/libonnxruntime.so.1*"
  lib_minor=$(basename "$ort_lib" | sed -E 's/^libonnxruntime\.so\.1\.([0-9]+).*/\1/')

  if [[ -z ${ONNXRUNTIME_INCLUDE_DIR:-} ]]; then
    deps="$build/deps/onnxruntime-dev"
    ONNXRUNTIME_INCLUDE_DIR="$deps/usr/include/onnxruntime"
    if [[ ! -f $ONNXRUNTIME_INCLUDE_DIR/onnxruntime_cxx_api.h ]]; then
      command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
        die "no apt-get/dpkg-deb to fetch ONNX Runtime headers: set ONNXRUNTIME_INCLUDE_DIR to a folder with onnxruntime_cxx_api.h"
      apt_dir="$build/deps/apt"
      rm -rf "$apt_dir" && mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $ORT_DEB_SUITE main" \
        >"$apt_dir/sources.list"
      apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1 -qq)
      # As root, apt would hand downloads to the _apt user, who cannot write into the build folder.
      [[ $(id -u) == 0 ]] && apt_opts+=(-o APT::Sandbox::User=root)
      echo "build.sh: fetching ONNX Runtime headers (Debian $ORT_DEB_SUITE libonnxruntime-dev)" >&2
      apt-get "${apt_opts[@]}" update >&2 || die "apt-get update ($ORT_DEB_SUITE) failed"
      (cd "$apt_dir" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >&2) ||
        die "apt-get download libonnxruntime-dev failed"
      rm -rf "$deps" && dpkg-deb -x "$apt_dir"/libonnxruntime-dev_*.deb "$deps"
      rm -rf "$apt_dir"
    fi
  fi
  header="$ONNXRUNTIME_INCLUDE_DIR/onnxruntime_c_api.h"
  [[ -f $header ]] || die "$header not found"
  api=$(sed -nE 's/^#define ORT_API_VERSION ([0-9]+).*/\1/p' "$header")
  if [[ -n $api && -n $lib_minor && $api -gt $lib_minor ]]; then
    die "ONNX Runtime headers (API $api) are newer than the library $ort_lib: use headers <= 1.$lib_minor"
  fi
  ort_args=(-DKDQ_EDGE_ORT=ON "-DONNXRUNTIME_INCLUDE_DIR=$ONNXRUNTIME_INCLUDE_DIR" "-DONNXRUNTIME_LIBRARY=$ort_lib")
fi

cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$torch_prefix" "${ort_args[@]}" >&2
cmake --build "$build" -j "$JOBS" >&2
echo "$build"
