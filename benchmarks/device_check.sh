#!/usr/bin/env bash
# The device check (benchmarks/device_check.py): reference loop vs. the project's trainer, Ray's
# fractional GPUs and a 4-trial `study run`, printed as one Markdown table.
#
#   bash benchmarks/device_check.sh                 # on a GPU machine (at most ~8 minutes, no network)
#   bash benchmarks/device_check.sh --cpu           # the same code paths, small, on the CPU
#   bash benchmarks/device_check.sh --out check.md  # also write the table to check.md
set -euo pipefail
# a relative --out is relative to where the script was started, not to the repo root
export DEVICE_CHECK_CWD="$PWD"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi
exec "$PY" benchmarks/device_check.py "$@"
