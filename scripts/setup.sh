#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine: system libraries, then a Python venv in .venv with requirements.txt.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [--browser] [--bench]
#   --browser  also install a chromium for the drawing-page tests: Debian's chromium + chromium-driver,
#              or where apt has none (Ubuntu ships it as a snap), Playwright's own build
#   --bench    also install wrk (load generator of benchmarks/bench_api.py) and benchmarks/requirements.txt
# PYTHON=/path/to/python3.x picks the interpreter (3.11 or newer); otherwise python3.11, then python3.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash scripts/setup.sh [--browser] [--bench]"
want_browser=0
want_bench=0
for arg in "$@"; do
  case $arg in
    --browser) want_browser=1 ;;
    --bench) want_bench=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "setup: unknown option '$arg'; $usage" >&2; exit 2 ;;
  esac
done

sudo_cmd=()
if (( EUID != 0 )); then sudo_cmd=(sudo); fi
apt_updated=0

apt_update_once() {
  if (( ! apt_updated )); then
    "${sudo_cmd[@]}" apt-get update -qq
    apt_updated=1
  fi
}

# Whether apt can install the package (fresh images have empty package lists, hence the update).
apt_has() {
  apt_update_once
  local candidate
  candidate=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
  [[ -n $candidate && $candidate != "(none)" ]]
}

# Install the packages not yet installed; sudo resets the environment, hence env for DEBIAN_FRONTEND.
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  (( ${#missing[@]} )) || return 0
  echo "setup: installing system packages: ${missing[*]}"
  apt_update_once
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Python 3.11 or newer: the pinned torch wheels and the code's syntax need it.
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [[ -n ${PYTHON:-} ]]; then
  python=$PYTHON
  python_ok "$python" || { echo "setup: PYTHON=$python is not a Python 3.11 or newer" >&2; exit 1; }
else
  python=
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && python_ok "$candidate"; then
      python=$(command -v "$candidate")
      break
    fi
  done
  if [[ -z $python ]]; then
    echo "setup: needs Python 3.11 or newer (python3 is $(command -v python3 >/dev/null && python3 --version 2>&1 || echo absent));" \
         "install it (apt-get install python3.11 python3.11-venv) or set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
fi

# System packages: libcairo2 renders strokes (cairocffi loads it at run time). Debian and Ubuntu ship
# venv's ensurepip apart from python (python3.X-venv); without it `python -m venv` fails halfway.
packages=(libcairo2)
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  packages+=("python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv")
fi
# Whether an earlier run already fetched Playwright's own chromium (then apt need not be asked again).
playwright_has_chromium() {
  .venv/bin/python -c '
import sys
from pathlib import Path
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    sys.exit(not Path(p.chromium.executable_path).exists())' 2>/dev/null
}
# Optional packages, where apt has them: the drawing-page tests drive /usr/bin/chromium, bench_api uses wrk.
if (( want_browser )) && [[ ! -x /usr/bin/chromium ]] && ! playwright_has_chromium && apt_has chromium; then
  packages+=(chromium chromium-driver)
fi
if (( want_bench )) && ! command -v wrk >/dev/null && apt_has wrk; then
  packages+=(wrk)
fi
apt_install "${packages[@]}"

# A venv is usable only when it is one, on Python 3.11+, with a working pip: an interrupted or pip-less
# creation leaves .venv/bin/python behind, so its mere presence proves nothing.
venv_ok() {
  .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11) or sys.prefix == sys.base_prefix)' \
    2>/dev/null && .venv/bin/python -m pip --version >/dev/null 2>&1
}
if ! venv_ok; then
  [[ -e .venv ]] && echo "setup: .venv is not a Python 3.11+ venv with a working pip, recreating it"
  echo "setup: creating .venv with $python"
  "$python" -m venv --clear .venv
fi

# Reinstall only when the requirements file changed since its last successful install.
pip_install() {
  local name=${1%.txt} stamp digest
  stamp=.venv/.${name//\//-}.sha256   # requirements.txt -> .venv/.requirements.sha256
  digest=$(sha256sum "$1" | cut -d' ' -f1)
  [[ -f $stamp && "$(cat "$stamp")" == "$digest" ]] && return 0
  echo "setup: installing Python packages from $1 (minutes the first time)"
  .venv/bin/python -m pip install -q -r "$1"
  echo "$digest" > "$stamp"
}
pip_install requirements.txt
# The project itself, editable: `import utils` / `import app` work from any folder, with no sys.path edits.
if ! .venv/bin/python -c 'import importlib.metadata as m; m.version("quickdraw")' 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-deps -e .
fi
(( want_bench )) && pip_install benchmarks/requirements.txt
if (( want_bench )) && ! command -v wrk >/dev/null; then
  echo "setup: wrk is not available from apt; benchmarks/bench_api.py will generate load with httpx"
fi

# Without a chromium package (Ubuntu), Playwright fetches its own build and the system libraries it needs.
if (( want_browser )) && [[ ! -x /usr/bin/chromium ]] && ! playwright_has_chromium; then
  echo "setup: no chromium package in apt, installing Playwright's chromium"
  .venv/bin/python -m playwright install --with-deps chromium || {
    echo "setup: could not install a chromium; on Debian: apt-get install chromium chromium-driver" >&2
    exit 1
  }
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
