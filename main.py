"""P-Tuning v2 for chat models: ``python main.py [COMMAND] FLAGS`` (see ``python main.py --help``).

The same entry point is installed as the ``ptuning`` console script (``pip install -e .``); the code lives in
``ptuning/cli.py`` (commands and help) and ``ptuning/workflow.py`` (the training run).
"""

import sys

from ptuning.cli import main, run  # noqa: F401  (tests and wrappers call main.main / main.run)

if __name__ == "__main__":
    sys.exit(main())
