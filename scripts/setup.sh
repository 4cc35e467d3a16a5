#!/usr/bin/env bash
# Prepare a fresh Linux machine: system libraries, then a Python venv in .venv with requirements.txt.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [--browser]
#   --browser  also install Debian's chromium + chromium-driver (the drawing-page tests use them)
set -euo pipefail
cd "$(dirname "$0")/.."

want_browser=0
[[ "${1:-}" == "--browser" ]] && want_browser=1

# System packages: libcairo2 renders strokes (cairocffi loads it at run time); chromium for page tests.
packages=(libcairo2)
(( want_browser )) && packages+=(chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if (( ${#missing[@]} )); then
  echo "setup: installing system packages: ${missing[*]}"
  sudo_cmd=()
  (( EUID != 0 )) && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python 3.11 is what the pinned torch wheels are built for; fall back to python3.
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $python"
  "$python" -m venv .venv
fi

# Reinstall only when requirements.txt changed since the last successful install.
stamp=.venv/.requirements.sha256
digest=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ ! -f $stamp || "$(cat "$stamp")" != "$digest" ]]; then
  echo "setup: installing Python packages (first time: a few minutes, torch is large)"
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$digest" > "$stamp"
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
