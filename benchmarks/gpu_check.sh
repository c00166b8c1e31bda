#!/usr/bin/env bash
# One GPU check (issue #10), from a fresh copy of the repo on the lent GPU machine, in one call:
#   0. install the repo without network; the GPU, its driver and torch's view of them
#   1. the gpu-marked tests (pytest -m gpu), time-capped
#   2. benchmarks/bench_input.py: the host's input pipeline alone (no GPU), capped at 45 s: how
#      many rows/s its cores can decode for the model, and at what cost to the job's process
#   3-5. benchmarks/bench_gpu.py: encoder, decoder and end-to-end sections, each time-capped and
#        run in its own process, so one that fails or hangs costs only its own time
# Everything printed goes to stdout; the tables also go to $OUT/gpu_check.md (./gpu_check.md
# where OUT is unset).
#
#   bash benchmarks/gpu_check.sh             # the GPU machine: about 7 minutes at most
#   bash benchmarks/gpu_check.sh --tiny      # tiny model, CPU where there is no CUDA: debug it here
#
# Arguments go to bench_gpu.py. V2T_CHECK_SECONDS (default 420) bounds the whole run, steps 0-1
# included; V2T_CHECK_PYTEST_SECONDS (default 100) caps step 1. V2T_CHECK_INSTALL picks how step 0
# makes the repo importable: pip (an editable install; the entry points v2t.backends and
# v2t.commands need installed metadata), shim (no install: PYTHONPATH to a folder that maps
# v2t_training and v2t_export onto training/ and export/ and holds the entry points read from
# pyproject.toml), skip (use what is installed), or auto (default: pip, then shim if pip fails).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$SECONDS
TOTAL=${V2T_CHECK_SECONDS:-420}
PYTEST_CAP=${V2T_CHECK_PYTEST_SECONDS:-100}
REPORT=${OUT:-.}/gpu_check.md
TMP=$(mktemp -d "${TMPDIR:-/tmp}/v2t-gpu-check.XXXXXX") || exit 1
left() { echo $((TOTAL - (SECONDS - T0))); }
say() { printf '%s\n' "$*" | tee -a "$REPORT"; }

# Where pip cannot install (an old setuptools, say), the packages are imported through links
# and the entry points through a dist-info folder: importlib.metadata finds both on PYTHONPATH.
make_shim() {
    local shim="$TMP/shim"
    mkdir -p "$shim" && "$PY" - "$shim" <<'EOF'
import sys
import tomllib
from pathlib import Path

shim, root = Path(sys.argv[1]), Path.cwd()
meta = tomllib.loads((root / "pyproject.toml").read_text())
project = meta["project"]
for name, folder in meta["tool"]["setuptools"]["package-dir"].items():
    (shim / name).symlink_to(root / folder, target_is_directory=True)
info = shim / f"{project['name']}-{project['version']}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in groups.items()))
EOF
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
}

# The repo's packages import from this tree, and the backends are registered.
check_install() {
    "$PY" - <<'EOF'
import os
from importlib.metadata import entry_points

import v2t_engine, v2t_export, v2t_training  # noqa: F401

here = os.path.realpath("training")
found = os.path.realpath(os.path.dirname(v2t_training.__file__))
assert found == here, f"v2t_training is imported from {found}, not {here}"
print("backends:", ", ".join(sorted(ep.name for ep in entry_points(group="v2t.backends"))))
EOF
}

install() {
    local mode=${V2T_CHECK_INSTALL:-auto}
    if [ "$mode" = pip ] || [ "$mode" = auto ]; then
        if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$TMP/pip.log" 2>&1 \
                && check_install; then
            say "install: pip install -e . (editable, no network)"
            return 0
        fi
        say "install: pip install -e . failed:"
        tail -n 15 "$TMP/pip.log" | tee -a "$REPORT"
        [ "$mode" = pip ] && return 1
    fi
    if [ "$mode" = skip ]; then
        check_install && say "install: skipped, using what is installed" && return 0
        return 1
    fi
    make_shim && check_install && say "install: none; PYTHONPATH shim ($PYTHONPATH)"
}

: >"$REPORT"
say "# v2t GPU check"
say ""
say "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), args: ${*:-none}"
say ""
say "## 0. Install and device"
say ""
SETUPTOOLS=$("$PY" -c 'import setuptools; print(setuptools.__version__)' 2>/dev/null || echo missing)
say "python: $("$PY" --version 2>&1), setuptools $SETUPTOOLS"
if ! install; then
    say "ERROR: the repo cannot be imported; nothing else can run"
    exit 1
fi
say ""
say '```'
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$REPORT"
else
    say "nvidia-smi: not found (no NVIDIA GPU here)"
fi
"$PY" -c "import torch; c = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, '->', torch.cuda.get_device_name(0) if c else 'no CUDA device: the benchmarks fall back to the CPU')" 2>&1 | tee -a "$REPORT"
say '```'

say ""
say "## 1. GPU tests: pytest -m gpu (capped at ${PYTEST_CAP} s)"
say ""
# --continue-on-collection-errors: a test module that cannot even be imported here must not
# stop the gpu tests of the others.
timeout -k 10 "$PYTEST_CAP" "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider --continue-on-collection-errors \
    >"$TMP/pytest.log" 2>&1
rc=$?
cat "$TMP/pytest.log"
case $rc in
    0) verdict="passed" ;;
    5) verdict="no gpu-marked tests were collected" ;;
    124 | 137) verdict="stopped at the ${PYTEST_CAP} s cap" ;;
    *) verdict="FAILED (pytest exit $rc)" ;;
esac
say "pytest -m gpu: $verdict after $((SECONDS - T0)) s of the check"
{
    echo '```'
    grep -E "^(SKIPPED|FAILED|ERROR)|passed|failed|skipped|error|deselected" "$TMP/pytest.log" | tail -n 25
    echo '```'
} >>"$REPORT"

say ""
say "## 2. Input pipeline alone: benchmarks/bench_input.py (capped at 45 s)"
INPUT_ARGS="--rows 1024 --repeats 1"
case " $* " in *" --tiny "*) INPUT_ARGS="--tiny --repeats 1" ;; esac
# shellcheck disable=SC2086
timeout -k 5 45 "$PY" benchmarks/bench_input.py $INPUT_ARGS --workdir "$TMP/input" >"$TMP/input.log" 2>&1
input_rc=$?
grep -E "^\||^input pipeline" "$TMP/input.log" | tee -a "$REPORT"
[ "$input_rc" -eq 0 ] || { say "bench_input.py: exit $input_rc"; tail -n 5 "$TMP/input.log"; }

BUDGET=$(($(left) - 15))
if [ "$BUDGET" -lt 60 ]; then
    say "benchmarks: skipped, ${BUDGET} s left"
    exit 1
fi
# The benchmarks get what is left, less a margin for the last report lines; bench_gpu.py splits
# it among its sections and kills any that outruns its share.
timeout -k 10 $((BUDGET + 10)) "$PY" benchmarks/bench_gpu.py --budget "$BUDGET" --report "$REPORT" --append "$@"
bench=$?
say ""
say "gpu_check: done in $((SECONDS - T0)) s (bench_gpu.py exit $bench; tables in $REPORT)"
rm -rf "$TMP"
[ "$bench" -eq 0 ] && [ "$rc" -eq 0 -o "$rc" -eq 5 ]
