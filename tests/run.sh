#!/usr/bin/env bash
# The whole test suite, from a fresh clone: system packages (as root), a virtualenv, lint, types, tests.
# Usage: tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Real OpenSSH is what the simulated cloud's instances run; rsync is the seed workflow's way in the benchmarks;
# busybox-static is the BusyBox image profile's whole userland; iproute2 builds the simulator's overlay networks.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for pkg in openssh-server openssh-client rsync busybox-static iproute2 python3-pip; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# PyTorch on CPU for the simulated instances' Python (the system python3, which the image profiles with torch run):
# the multi-node tests launch a real two-node torchrun. The CPU build of torch 2.13.0; skipped once a torch 2 is
# present. Where no local CPU wheel exists, point pip at PyTorch's CPU index
# (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) or it fetches the much bigger CUDA build. Debian's
# python3-torch (1.13) does not do: its torchrun crashes on Python 3.11 (its `--redirects 0` default maps to nothing).
torch2='import sys, torch; sys.exit(int(torch.__version__.split(".")[0]) < 2)'
if [ "$(id -u)" = 0 ] && [ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c "$torch2" 2>/dev/null; then
  echo "installing torch 2.13.0 (CPU) for the system python3"
  /usr/bin/python3 -m pip install -q --break-system-packages --disable-pip-version-check torch==2.13.0
fi

# The MCP Inspector CLI is the client from outside this project that the end-to-end tests drive the server with.
inspector=.cache/inspector
if command -v npm >/dev/null && [ ! -x "$inspector/node_modules/.bin/mcp-inspector" ]; then
  echo "installing @modelcontextprotocol/inspector"
  mkdir -p "$inspector"
  npm install --prefix "$inspector" --silent --no-audit --no-fund @modelcontextprotocol/inspector@2.12.0 >/dev/null
fi

# The official TypeScript SDK's client is one of the foreign clients tests/foreign drives the server with (pinned
# here and in tests/foreign/foreign_clients.py).
ts_sdk=.cache/ts-sdk
if command -v npm >/dev/null && [ ! -f "$ts_sdk/node_modules/@modelcontextprotocol/sdk/package.json" ]; then
  echo "installing @modelcontextprotocol/sdk"
  mkdir -p "$ts_sdk"
  npm install --prefix "$ts_sdk" --silent --no-audit --no-fund @modelcontextprotocol/sdk@1.32.2 >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check vast_mcp tests bench
.venv/bin/ruff format --check vast_mcp tests bench
.venv/bin/mypy vast_mcp
# The test files run side by side (each file on one worker, so its module fixtures are built once): most tests
# wait on SSH, processes and the simulated cloud rather than compute. VAST_MCP_TEST_WORKERS=0 runs them one by one.
.venv/bin/pytest -n "${VAST_MCP_TEST_WORKERS:-2}" --dist loadfile "$@"
