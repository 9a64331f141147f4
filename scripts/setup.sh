#!/usr/bin/env bash
# Create .venv (if needed) and install alloy into it, torch first.
#
# torch==2.13.0 is installed before anything that depends on torch: on a fresh environment a
# plain `torch` requirement would otherwise pull a multi-GB CUDA build. Idempotent and quiet when
# everything is already there. Usage: bash scripts/setup.sh [extra,...]   (default extra: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      python=$candidate
      break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "setup: needs Python >= 3.10 (set PYTHON=/path/to/python)" >&2
  exit 1
fi

if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' 2>/dev/null; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt-get update -qq && apt-get install -y -qq "python${version}-venv" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
stamp=.venv/.alloy-setup
want="torch==2.13.0 extras=$extras $(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "${pip[@]}" --upgrade pip
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" -e ".[$extras]"
  echo "$want" >"$stamp"
fi
