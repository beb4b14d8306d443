#!/usr/bin/env bash
# Every GPU figure in one go (< 8 minutes on one H200): limits, training step vs PEFT with MFU, bf16/INT4 peak memory
# vs the planner, decode tokens/s vs HBM bandwidth; one markdown file under bench/results/. --smoke: tiny, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/gpu_suite.py "$@"
