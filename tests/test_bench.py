"""The benchmark scripts run end to end on a micro config, and every variant's step-1 loss equals PEFT's."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(name, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", name), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def table_rows(out):
    return [line.split("|")[1:-1] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")]


def test_train_step_table_and_loss_equality():
    out = run_bench("train_step.py", "--config", "micro", "--steps", "2", "--warmup", "0", "--batch", "2",
                    "--source_len", "12", "--target_len", "6", "--pre_seq_len", "4", "--threads", "1",
                    "--variants", "ours,ours-full-logits")
    rows = table_rows(out)
    assert [r[0].strip() for r in rows] == ["peft", "ours", "ours-full-logits"]
    losses = [float(r[-1]) for r in rows]
    assert max(losses) - min(losses) <= 1e-4
    assert all(float(r[1]) > 0 and float(r[4]) >= 0 for r in rows)
