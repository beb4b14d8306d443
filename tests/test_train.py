"""Reliability of training runs: a SIGKILLed run resumes bit-identically, checkpoints appear atomically, a NaN stops
(or skips) with a message, SIGTERM saves before exiting, ``--save_total_limit`` still rotates.

Crashes are real: ``tests/crash_run.py`` runs main.py in a subprocess and kills it at a chosen point.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import main
from crash_run import forward_with_nan_at
from ptuning import model as model_module
from ptuning import train
from ptuning.train import PrefixTrainer, commit_checkpoint, latest_checkpoint, remove_partial_checkpoints
from tiny_models import save_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRASH_RUN = os.path.join(ROOT, "tests", "crash_run.py")
STEPS = 8
PROMPTS = ["hi", "what", "tell me", "a b c", "xyz", "hello there", "why?", "ok go", "seven", "eight 8"]
PREFIX_FILES = ("prefix_model.safetensors", "prefix_encoder.safetensors")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model = save_tiny_checkpoint(root / "model")
    with open(root / "train.jsonl", "w") as f:
        for p in PROMPTS:  # 10 rows, batch 3: the epoch boundary falls inside the run
            f.write(json.dumps({"prompt": p, "response": f"OK: {p}"}) + "\n")
    return root, model


def flags(workspace, out, *extra):
    root, model = workspace
    # dropout makes the result depend on the restored RNG state, not only on weights and data order
    return ["--model_name_or_path", model, "--do_train", "--train_file", str(root / "train.jsonl"), "--output_dir",
            str(out), "--report_to", "none", "--use_cpu", "--seed", "0", "--pre_seq_len", "4", "--prefix_projection",
            "--prefix_hidden_size", "16", "--prefix_dropout", "0.1", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "3", "--logging_steps", "1", "--save_steps", "2",
            "--max_source_length", "32", "--max_target_length", "16", "--max_steps", str(STEPS), *extra]


def crash_run(argv, **faults):
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               **{f"CRASH_{k.upper()}": str(v) for k, v in faults.items()}}
    return subprocess.run([sys.executable, CRASH_RUN, *argv], capture_output=True, text=True, cwd=ROOT, env=environ,
                          timeout=300)


def tensors(directory):
    return {f"{name}:{k}": v for name in PREFIX_FILES for k, v in load_file(str(directory / name)).items()}


def assert_bit_identical(got_dir, want_dir):
    got, want = tensors(got_dir), tensors(want_dir)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), (key, (got[key] - want[key]).abs().max())


def losses(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    out = workspace[0] / "uninterrupted"
    proc = crash_run(flags(workspace, out, "--save_total_limit", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_save_total_limit_keeps_rotating_and_nothing_partial_is_left(uninterrupted):
    assert sorted(n for n in os.listdir(uninterrupted) if "checkpoint" in n) == ["checkpoint-6", "checkpoint-8"]


def test_killed_mid_save_then_after_a_step_resumes_bit_identically(workspace, uninterrupted):
    out = workspace[0] / "crashed"
    # 1. SIGKILL after checkpoint-4 is written but before it is renamed into place
    proc = crash_run(flags(workspace, out), kill_in_save=4)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(out)) == [".checkpoint-4.partial", "checkpoint-2"]
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    # 2. resume from checkpoint-2, then SIGKILL right after step 5 (checkpoint-4 is rewritten, step 5 lost)
    proc = crash_run(flags(workspace, out, "--resume_from_checkpoint", "latest"), kill_after_step=5)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "left by a save that was interrupted" in proc.stdout + proc.stderr
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]
    # 3. resume again: the run ends exactly where the uninterrupted one did
    proc = crash_run(flags(workspace, out, "--resume_from_checkpoint", "latest"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_bit_identical(out, uninterrupted)
    assert_bit_identical(out / "checkpoint-8", uninterrupted / "checkpoint-8")
    got, want = losses(out / "checkpoint-8"), losses(uninterrupted / "checkpoint-8")
    assert {s: got[s] for s in range(5, STEPS + 1)} == {s: want[s] for s in range(5, STEPS + 1)}
    for name in ("optimizer.pt", "scheduler.pt"):
        a = torch.load(out / "checkpoint-8" / name, weights_only=True)
        b = torch.load(uninterrupted / "checkpoint-8" / name, weights_only=True)
        assert str(a) == str(b)


def test_nan_stops_the_run_names_the_step_and_keeps_the_last_good_checkpoint(workspace, monkeypatch, capsys):
    out = workspace[0] / "nan"
    monkeypatch.setattr(model_module.PrefixTunedModel, "forward",
                        forward_with_nan_at(model_module.PrefixTunedModel.forward, 5))
    assert main.main(flags(workspace, out)) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: step 5: the loss is nan; training stopped and ")
    assert f"{out / 'checkpoint-4'} is the last good checkpoint" in err and "--learning_rate (now 0.01)" in err
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]  # no later checkpoint, no exported prefix
    assert all(torch.isfinite(t).all() for t in tensors(out / "checkpoint-4").values())


def test_skip_nonfinite_steps_skips_exactly_that_update(workspace, monkeypatch):
    out = workspace[0] / "nan_skip"
    monkeypatch.setattr(model_module.PrefixTunedModel, "forward",
                        forward_with_nan_at(model_module.PrefixTunedModel.forward, 5))
    assert main.main(flags(workspace, out, "--skip_nonfinite_steps", "--save_steps", "1")) == 0
    before, skipped, after = (tensors(out / f"checkpoint-{s}") for s in (4, 5, 6))
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # step 5 left the prefix alone
    assert not all(torch.equal(skipped[k], after[k]) for k in before)  # and training went on
    assert all(torch.isfinite(t).all() for t in tensors(out).values())


def test_too_many_skipped_updates_in_a_row_stop_the_run(workspace, monkeypatch, capsys):
    monkeypatch.setattr(train, "MAX_SKIPPED_IN_A_ROW", 0)
    monkeypatch.setattr(model_module.PrefixTunedModel, "forward",
                        forward_with_nan_at(model_module.PrefixTunedModel.forward, 1))
    assert main.main(flags(workspace, workspace[0] / "nan_skip_all", "--skip_nonfinite_steps")) == 3
    assert "error: step 1: the loss is nan; training stopped and no checkpoint was saved yet" in capsys.readouterr().err


def test_divergence_advice_points_fp16_runs_to_bf16():
    class Args:
        fp16, learning_rate = True, 3e-2

    trainer = PrefixTrainer.__new__(PrefixTrainer)
    trainer.args, trainer._skipped_in_a_row = Args(), 0
    assert trainer._divergence_advice() == "fp16 overflows easily: use --bf16 if the hardware has it, or lower " \
                                           "--learning_rate (now 0.03)"


def test_sigterm_saves_a_complete_checkpoint_exits_143_and_resumes_exactly(workspace):
    out = workspace[0] / "preempted"
    constant = ["--lr_scheduler_type", "constant", "--save_steps", "100000"]  # the schedule ignores --max_steps
    proc = crash_run(flags(workspace, out, "--enable_jit_checkpoint", *constant, "--max_steps", "100000"),
                     sigterm_after_step=3)
    assert proc.returncode == 143, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    checkpoint = latest_checkpoint(str(out))
    assert checkpoint is not None and last.endswith(f"error: SIGTERM: saved {os.path.basename(checkpoint)} in {out} "
                                                    "and stopped; continue with --resume_from_checkpoint latest")
    step = int(checkpoint.rsplit("-", 1)[1])
    assert step > 3
    assert sorted(os.listdir(out)) == [os.path.basename(checkpoint)]  # no half-run export next to it
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", *PREFIX_FILES} <= set(
        os.listdir(checkpoint))
    # the checkpoint is taken at a step boundary: resuming from it is exact too
    end = ["--max_steps", str(step + 2)]
    assert crash_run(flags(workspace, out, *constant, *end, "--resume_from_checkpoint", "latest")).returncode == 0
    reference = workspace[0] / "not_preempted"
    assert crash_run(flags(workspace, reference, *constant, *end)).returncode == 0
    assert_bit_identical(out, reference)


def test_commit_replaces_an_older_copy_whole(tmp_path):
    final, staging = tmp_path / "checkpoint-3", tmp_path / ".checkpoint-3.partial"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    commit_checkpoint(str(staging), str(final))
    assert os.listdir(tmp_path) == ["checkpoint-3"] and os.listdir(final) == ["new.txt"]


def test_latest_ignores_partial_and_incomplete_checkpoints(tmp_path):
    def checkpoint(name, *files):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("{}")

    checkpoint("checkpoint-2", "prefix_config.json", "trainer_state.json")
    checkpoint(".checkpoint-9.partial", "prefix_config.json", "trainer_state.json")
    checkpoint("checkpoint-7", "prefix_config.json")  # no trainer state
    checkpoint("checkpoint-8", "prefix_config.json", "trainer_state.json", "checkpoint-is-incomplete.txt")
    checkpoint("checkpoint-x", "prefix_config.json", "trainer_state.json")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    remove_partial_checkpoints(str(tmp_path))
    assert not (tmp_path / ".checkpoint-9.partial").exists() and (tmp_path / "checkpoint-8").exists()
