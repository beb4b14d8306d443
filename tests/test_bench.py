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
    """Body rows of the markdown table, each as a list of cells."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    return [line.split("|")[1:-1] for line in lines[2:]]


def test_train_step_table_and_loss_equality():
    out = run_bench("train_step.py", "--config", "micro", "--steps", "2", "--warmup", "0", "--batch", "2",
                    "--source_len", "12", "--target_len", "6", "--pre_seq_len", "4", "--threads", "1",
                    "--variants", "ours,ours-full-logits")
    rows = table_rows(out)
    assert [r[0].strip() for r in rows] == ["peft", "ours", "ours-full-logits"]
    losses = [float(r[-1]) for r in rows]
    assert max(losses) - min(losses) <= 1e-4
    assert all(float(r[1]) > 0 and float(r[4]) >= 0 for r in rows)


def test_generate_bench_prints_both_batches():
    out = run_bench("generate.py", "--config", "micro", "--prompt_len", "8", "--new_tokens", "4", "--repeats", "1",
                    "--threads", "1")
    rows = table_rows(out)
    assert [int(r[0]) for r in rows] == [1, 8]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def test_scaling_bench_writes_table_and_png(tmp_path):
    from PIL import Image

    png = tmp_path / "scaling.png"
    out = run_bench("scaling.py", "--config", "micro", "--pre_seq_lens", "4,8", "--seq_lens", "", "--batches", "",
                    "--pre_seq_len", "4", "--seq_len", "16", "--batch", "1", "--steps", "1", "--threads", "1",
                    "--png", str(png))
    assert [(r[0].strip(), int(r[1])) for r in table_rows(out)] == [("pre_seq_len", 4), ("pre_seq_len", 8)]
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 100
