"""`python tests/crash_run.py MAIN_ARGS...`: main.py with a fault injected at a chosen step, for the reliability tests.

CRASH_KILL_AFTER_STEP=k     SIGKILL this process right after optimizer step k (before step k's checkpoint is saved)
CRASH_KILL_IN_SAVE=k        SIGKILL between writing checkpoint-k and renaming it into place
CRASH_SIGTERM_AFTER_STEP=k  send this process SIGTERM after step k (what a preempting scheduler does)
CRASH_NAN_AT_STEP=k         the loss of optimizer step k is NaN
CRASH_ONLY_RANK=r           inject the step faults on rank r alone (default: every rank)
"""

import functools
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main  # noqa: E402
from ptuning import model as model_module  # noqa: E402
from ptuning import train  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


def step_from_env(name):
    value = os.environ.get(name)
    return int(value) if value else None


class Fault(TrainerCallback):
    def __init__(self):
        self.kill_after = step_from_env("CRASH_KILL_AFTER_STEP")
        self.sigterm_after = step_from_env("CRASH_SIGTERM_AFTER_STEP")
        only = step_from_env("CRASH_ONLY_RANK")
        if only is not None and only != int(os.environ.get("RANK", "0")):
            self.kill_after = self.sigterm_after = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if state.global_step == self.sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)


def install() -> None:
    init = train.PrefixTrainer.__init__

    def init_with_fault(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Fault())

    train.PrefixTrainer.__init__ = init_with_fault

    kill_in_save = step_from_env("CRASH_KILL_IN_SAVE")
    if kill_in_save is not None:
        commit = train.commit_checkpoint

        def commit_or_die(staging, final):
            if final.endswith(f"-{kill_in_save}"):
                os.kill(os.getpid(), signal.SIGKILL)
            commit(staging, final)

        train.commit_checkpoint = commit_or_die

    nan_at = step_from_env("CRASH_NAN_AT_STEP")
    if nan_at is not None:
        model_module.PrefixTunedModel.forward = forward_with_nan_at(model_module.PrefixTunedModel.forward, nan_at)


def forward_with_nan_at(forward, step: int):
    """``PrefixTunedModel.forward`` whose ``step``-th training call (1-based) returns a NaN loss."""
    calls = {"n": 0}

    @functools.wraps(forward)  # the Trainer reads the signature to pick dataset columns
    def forward_with_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == step and out.loss is not None:
                out.loss = out.loss * float("nan")
        return out

    return forward_with_nan


if __name__ == "__main__":
    install()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main.main(sys.argv[1:]))
