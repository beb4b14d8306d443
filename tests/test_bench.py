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


def tables(out):
    """Every markdown table in ``out``: its body rows, each as a list of stripped cells."""
    found, rows = [], None
    for line in out.splitlines() + [""]:
        if line.startswith("|"):
            rows = [] if rows is None else rows
            rows.append([cell.strip() for cell in line.split("|")[1:-1]])
        elif rows is not None:
            found.append(rows[2:])
            rows = None
    return found


def table_rows(out):
    """Body rows of the first markdown table, each as a list of cells."""
    return tables(out)[0]


MICRO = ["--config", "micro", "--steps", "2", "--warmup", "0", "--batch", "2", "--source_len", "12", "--target_len", "6",
         "--pre_seq_len", "4", "--threads", "1"]


def test_train_step_table_and_loss_equality():
    levers = ["ours", "ours-unchunked-ce", "ours-full-logits", "ours-eager-attn", "ours-gc", "ours-bf16-weights",
              "ours-bf16-autocast"]
    rows = table_rows(run_bench("train_step.py", *MICRO, "--variants", ",".join(levers)))
    assert [r[0] for r in rows] == ["peft", *levers]
    losses = {r[0]: float(r[-1]) for r in rows}
    fp32 = [v for k, v in losses.items() if "bf16" not in k]
    assert max(fp32) - min(fp32) <= 1e-4  # chunked, unchunked, full logits and GC compute PEFT's loss
    assert all(abs(losses[k] - losses["peft"]) <= 2e-2 * losses["peft"] for k in losses if "bf16" in k)
    assert all(float(r[1]) > 0 and float(r[4]) >= 0 for r in rows)


def test_train_step_gc_projection_per_row_and_length_grouping():
    out = run_bench("train_step.py", *MICRO, "--gc", "--prefix_projection", "--prefix_hidden_size", "16",
                    "--variants", "ours,ours-proj-per-row", "--length_grouping", "--mixed_batches", "16")
    steps, mixed = tables(out)
    # PEFT's prefix breaks under checkpointing in transformers 5: its row runs without GC and says so
    assert [r[0] for r in steps] == ["peft (no GC)", "ours", "ours-proj-per-row"]
    assert "drops PEFT's past_key_values" in out
    assert abs(float(steps[1][-1]) - float(steps[2][-1])) <= 1e-5  # the MLP once per step or per row: same loss
    assert [r[0] for r in mixed] == ["ours-mixed-random", "ours-mixed-grouped"]
    random, grouped = ({"steps": int(r[1]), "padded": int(r[2]), "pad": float(r[3]), "loss": float(r[-1])}
                       for r in mixed)
    assert random["steps"] == grouped["steps"] == 16
    assert grouped["padded"] < random["padded"] and grouped["pad"] < random["pad"]
    assert abs(grouped["loss"] - random["loss"]) <= 1e-4 * random["loss"]  # batching does not change the loss


def test_generate_bench_prints_both_batches_against_the_limits():
    out = run_bench("generate.py", "--config", "micro", "--prompt_len", "8", "--new_tokens", "4", "--repeats", "1",
                    "--threads", "1", "--modes", "eager,static", "--megabytes", "8")
    rows = table_rows(out)
    cells = [(int(r[0]), r[1], r[2]) for r in rows]
    assert cells == [(b, path, model) for b in (1, 8) for model in ("base", "prefix")
                     for path in ("generate()", "fast eager", "fast static")]
    # tokens/s, bytes/s against the bandwidth, FLOP/s against the matmul peak: all measured, all positive
    assert all(float(r[3]) > 0 and float(r[7]) > 0 and float(r[9]) > 0 and float(r[10]) > 0 for r in rows)
    assert "memory read" in out and "of the bandwidth bound" in out  # the run states its own limits


def test_limits_measure_bandwidth_and_matmul_peak():
    out = run_bench("limits.py", "--config", "micro", "--rows", "1,16", "--megabytes", "8", "--repeats", "1",
                    "--threads", "1")
    assert [int(r[0]) for r in table_rows(out)] == [1, 16] and all(float(r[1]) > 0 for r in table_rows(out))
    assert "memory read" in out


def test_flop_counts():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from limits import decode_step_bytes, decode_step_flops, linear_shapes, matmul_params, train_step_flops
    from train_step import build_config

    config = build_config("micro")  # GLM: hidden 64, 4 heads x 16, 2 kv heads, MLP 128, 2 layers, vocab 1024
    assert linear_shapes(config) == [(64, 64, 2), (64, 32, 4), (64, 64, 2), (64, 128, 4), (128, 64, 2), (64, 1024, 1)]
    n = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3) + 64 * 1024
    assert matmul_params(config) == n
    assert decode_step_flops(config, 2, 10) == 2 * (2 * n + 2 * 2 * 2 * 64 * 10)
    assert decode_step_bytes(config, 4 * n, 2, 10, 4) == 4 * n + 2 * 10 * (2 * 2 * 32 * 4)
    head = 64 * 1024
    attention = 2 * 2 * 2 * 64 * (4 + 13 / 2) * 2 * 12
    assert train_step_flops(config, 2, 12, 4, 5) == int(4 * (n - head) * 24 + 4 * head * 10 + 3 * attention)


def test_gpu_suite_smoke_writes_every_section(tmp_path):
    out = tmp_path / "suite.md"
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for heading in ("## Limits measured in this run", "## Training step", "## Peak memory", "## Decode", "## ZeRO-2"):
        assert heading in text
    limits, train, memory, decode = tables(text)[:4]
    assert all(float(r[1]) > 0 for r in limits)
    assert [r[0] for r in train] == ["peft (no GC)", "ours"]   # same step-1 loss:
    assert abs(float(train[0][-1]) - float(train[1][-1])) <= 1e-4
    assert all(float(r[-3]) > 0 for r in train)  # achieved GFLOP/s against the measured peak
    assert [r[0] for r in memory] == ["bf16", "int4"] and all(float(r[3]) > 0 and float(r[4]) > 0 for r in memory)
    assert {(int(r[0]), r[1], r[2]) for r in decode} == {(b, p, m) for b in (1, 8) for p in ("generate()", "fast auto")
                                                         for m in ("base", "prefix")}


def test_scaling_bench_writes_table_and_png(tmp_path):
    from PIL import Image

    png = tmp_path / "scaling.png"
    out = run_bench("scaling.py", "--config", "micro", "--pre_seq_lens", "4,8", "--seq_lens", "", "--batches", "",
                    "--pre_seq_len", "4", "--seq_len", "16", "--batch", "1", "--steps", "1", "--threads", "1",
                    "--png", str(png))
    assert [(r[0].strip(), int(r[1])) for r in table_rows(out)] == [("pre_seq_len", 4), ("pre_seq_len", 8)]
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 100
