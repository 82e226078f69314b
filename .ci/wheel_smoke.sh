#!/usr/bin/env bash
# Release smoke test: build the sdist and the wheel, install the wheel into a fresh venv
# (pinned CPU torch, nothing from the source tree), then import it and run the docs' quick
# start from a folder where the checkout is not importable. Then the sdist as a packager
# uses it: unpack it, install crossmae from the unpacked tree, and run a subset of the
# sdist's own tests there (those that read examples/, benchmarks/ and docs/, plus the API
# snapshot and the losses). Exits non-zero on any failure.
#
#   bash .ci/wheel_smoke.sh            # uses `python3`; PYTHON=.venv/bin/python to choose
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="$PWD"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
export PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg
# The throwaway venv (~800 MB) goes to tmpfs when there is one: on a disk mounted with
# `discard`, deleting it alone can take longer than the rest of this script.
TMP_ROOT="${WHEEL_SMOKE_TMPDIR:-}"
if [ -z "$TMP_ROOT" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then TMP_ROOT=/dev/shm; fi
WORK="$(mktemp -d ${TMP_ROOT:+-p "$TMP_ROOT"})"
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
step() { echo "== $1 ($((SECONDS - start)) s)"; }

step "build sdist + wheel"
if ! "$PY" -m build --version >/dev/null 2>&1; then
    echo "error: '$PY -m build' is not available; pip install build (it is in the dev extra)" >&2
    exit 1
fi
"$PY" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
shopt -s nullglob
wheels=("$WORK"/dist/crossmae-*.whl)
sdists=("$WORK"/dist/crossmae-*.tar.gz)
shopt -u nullglob
if [ "${#wheels[@]}" -ne 1 ] || [ "${#sdists[@]}" -ne 1 ]; then
    echo "error: expected one wheel and one sdist, got: $(ls "$WORK/dist")" >&2
    exit 1
fi
WHEEL="${wheels[0]}"
echo "built $(basename "${sdists[0]}") $(basename "$WHEEL")"

step "fresh venv: $TORCH_PIN, then the wheel"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# --no-compile: byte-compiling torch doubles the install time and buys nothing here
"$VPY" -m pip install -qq --no-compile "$TORCH_PIN"
"$VPY" -m pip install -qq --no-compile "$WHEEL"

step "check the wheel and the installed package"
mkdir "$WORK/run"
cd "$WORK/run"  # outside the checkout: only the installed wheel can be imported
"$VPY" - "$WHEEL" "$SRC" <<'EOF'
import sys
import zipfile
from pathlib import Path

import crossmae

wheel, src = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
names = zipfile.ZipFile(wheel).namelist()
if "crossmae/py.typed" not in names:
    sys.exit(f"crossmae/py.typed is missing from {wheel.name}")
where = Path(crossmae.__file__).resolve()
if src in where.parents:
    sys.exit(f"crossmae was imported from the source tree: {where}")
if not (where.parent / "py.typed").is_file():
    sys.exit(f"py.typed is not installed next to {where}")
if f"-{crossmae.__version__}-" not in wheel.name:
    sys.exit(f"wheel {wheel.name} does not carry crossmae.__version__ {crossmae.__version__}")
print("crossmae", crossmae.__version__, "from", where.parent)
EOF

step "docs quick start (first python block of docs/index.md)"
"$VPY" - "$SRC/docs/index.md" >"$WORK/quickstart.py" <<'EOF'
import re
import sys
from pathlib import Path

text = Path(sys.argv[1]).read_text(encoding="utf-8")
block = re.search(r"^```python[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
if block is None:
    sys.exit("no ```python block in docs/index.md")
print(block.group(1))
EOF
"$VPY" "$WORK/quickstart.py"

step "sdist: unpack, install from it, run its tests"
SDIST="${sdists[0]}"
mkdir "$WORK/sdist"
tar -xzf "$SDIST" -C "$WORK/sdist"
UNPACKED="$WORK/sdist/$(basename "$SDIST" .tar.gz)"
for need in tests examples benchmarks docs tools mkdocs.yml; do
    [ -e "$UNPACKED/$need" ] || { echo "error: the sdist lacks $need" >&2; exit 1; }
done
# Replaces the wheel's crossmae with one built from the unpacked sdist (a non-editable
# install: the tests import the installed package, as a distribution's check would).
"$VPY" -m pip install -qq --no-compile "$UNPACKED[dev,examples]"
cd "$UNPACKED"
"$VPY" -P -c "import crossmae, sys; sys.exit(0 if 'site-packages' in crossmae.__file__ else 'crossmae is not the installed copy: ' + crossmae.__file__)"
# `pytest` (not `python -m pytest`): the unpacked tree is not put on sys.path.
HYPOTHESIS_PROFILE=dev "$WORK/venv/bin/pytest" -q -p no:cacheprovider \
    tests/test_public_api.py tests/test_docs_snippets.py tests/test_losses.py \
    tests/test_benchmarks.py tests/examples
cd "$WORK"

elapsed=$((SECONDS - start))
echo "== wheel + sdist smoke test passed in ${elapsed} s"
if [ "$elapsed" -gt 240 ]; then echo "warning: over the 240 s budget" >&2; fi
