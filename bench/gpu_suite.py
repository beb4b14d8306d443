"""Every figure the GPU rows need, in one go, into one markdown file: the device's limits, the ChatGLM3-6B-geometry
training step (ours vs PEFT, MFU), its peak memory in bf16 and INT4 next to the planner's prediction, and decode
tokens/s at batch 1/8/32 with and without a prefix against HBM bandwidth.

    bash bench/gpu_suite.sh                # one GPU, < 8 minutes: bench/results/<date>-<gpu>-gpu_suite.md
    bash bench/gpu_suite.sh --smoke        # tiny configs on CPU in about a minute (the test suite runs this)

Weights are random, built from the config on the device (no download, nothing compiled: CUDA graphs are captured
at run time). Each section runs in its own process where peak memory matters (bench/train_step.py and
bench/memory.py start their own), and each section's time is logged, so an overrun shows where it went. With more
than one GPU a 2-process ZeRO-2 row runs too (bench/distributed.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

# The full run (one GPU) and the smoke run (CPU, seconds): the same sections, other sizes.
PROFILES = {
    "gpu": dict(config="chatglm3-6b", dtype="bf16", batch=4, source_len=64, target_len=128, pre_seq_len=128,
                steps=3, warmup=1, memory_config="chatglm3-6b", memory_batch=4, prompt_len=64, new_tokens=64,
                decode_batches=[1, 8, 32], decode_modes=["auto", "eager"], repeats=2, megabytes=1024,
                zero_batch=8, zero_seq=512),
    "smoke": dict(config="micro", dtype="fp32", batch=2, source_len=8, target_len=4, pre_seq_len=4, steps=1,
                  warmup=0, memory_config="micro", memory_batch=2, prompt_len=6, new_tokens=3, decode_batches=[1, 8],
                  decode_modes=["auto"], repeats=1, megabytes=16, zero_batch=2, zero_seq=16),
}


def log(message: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def device_line() -> tuple[str, str]:
    """(short device name for the file name, a sentence for the report)."""
    import platform

    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        total = torch.cuda.get_device_properties(0).total_memory
        return (name.split()[-1].lower(), f"{torch.cuda.device_count()} x {name} ({total / 2**30:.0f} GiB, "
                                          f"CUDA {torch.version.cuda})")
    return "cpu", f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def limits_section(p: dict, device) -> tuple[str, dict]:
    import torch

    from limits import bandwidth, matmul_peak
    from tables import markdown_table
    from train_step import build_config

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[p["dtype"]]
    config = build_config(p["config"])
    bw = bandwidth(device, p["megabytes"])
    train_rows = p["batch"] * (p["source_len"] + p["target_len"])
    peaks = {rows: matmul_peak(config, rows, dtype, device, repeats=3) for rows in [*p["decode_batches"], train_rows]}
    rows = [[str(r), f"{v / 1e12:.3f}", "training step" if r == train_rows else "decode step"]
            for r, v in peaks.items()]
    text = "\n".join([
        "## Limits measured in this run", "",
        f"Memory read {bw['read'] / 1e9:.0f} GB/s, copy {bw['copy'] / 1e9:.0f} GB/s ({p['megabytes']} MiB buffers). "
        f"Matmul peak on {p['config']}'s own weight shapes ({p['dtype']}), by rows per matmul:", "",
        markdown_table(["rows", "TFLOP/s", "used by"], rows)])
    return text, dict(bandwidth=bw, peaks=peaks, train_rows=train_rows)


def train_section(p: dict, device, limits: dict) -> str:
    import train_step

    args = dict(config=p["config"], dtype=p["dtype"], batch=p["batch"], source_len=p["source_len"],
                target_len=p["target_len"], pre_seq_len=p["pre_seq_len"], gc=True, steps=p["steps"],
                warmup=p["warmup"], threads=max(1, min(4, os.cpu_count() or 1)), device=device.type, timeout=900)
    results = train_step.measure(args, ["peft", "ours"])
    args = {**train_step.OPTIONAL_ARGS, **args}
    return "\n".join(["## Training step: ours vs PEFT, MFU against the measured matmul peak", "",
                      train_step.table(results, args, limits["peaks"][limits["train_rows"]])])


def memory_section(p: dict, device, workdir: str) -> str:
    """bench/memory.py in its own processes: bf16 and INT4 (NF4) peaks next to ptuning.memory's plan."""
    cmd = [sys.executable, os.path.join(BENCH, "memory.py"), "--config", p["memory_config"], "--dtypes", "bf16,int4",
           "--batches", str(p["memory_batch"]), "--gc", "on", "--steps", str(max(1, p["steps"] - 1)),
           "--pre_seq_len", str(p["pre_seq_len"]), "--source_len", str(p["source_len"]),
           "--target_len", str(p["target_len"]), "--model_dir", os.path.join(workdir, "memory-model"),
           "--device", device.type]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return f"## Peak memory vs planner\n\nbench/memory.py failed ({proc.returncode}):\n\n```\n{proc.stderr[-1500:]}\n```"
    report = proc.stdout[proc.stdout.index("# Prefix-tuning step memory"):]
    return "## Peak memory: bf16 and INT4, measured vs planned (ptuning/memory.py)\n\n" + report.split("\n", 1)[1]


def decode_section(p: dict, device) -> str:
    import generate

    args = dict(config=p["config"], dtype=p["dtype"], pre_seq_len=p["pre_seq_len"], prompt_len=p["prompt_len"],
                new_tokens=p["new_tokens"], batches=p["decode_batches"], modes=p["decode_modes"],
                repeats=p["repeats"], threads=max(1, min(4, os.cpu_count() or 1)), megabytes=p["megabytes"],
                device=device.type)
    measured = generate.measure(args)
    lines = ["## Decode: tokens/s vs generate(), against memory bandwidth and the matmul peak", "",
             f"prompt {p['prompt_len']}, {p['new_tokens']} new tokens, pre_seq_len {p['pre_seq_len']}; 'fast auto' is "
             f"ptuning.decode's default for the device (CUDA graphs on a GPU). Memory read bandwidth in this process: "
             f"{measured['bandwidth']['read'] / 1e9:.0f} GB/s.", "", generate.table(measured), ""]
    for path in sorted({r["path"] for r in measured["rows"]}):
        lines += [f"- {line}" for line in generate.targets(measured, path)]
    return "\n".join(lines)


def zero_section(p: dict, device) -> str:
    import torch

    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return "## ZeRO-2, 2 processes\n\nSkipped: needs two GPUs."
    cmd = [sys.executable, os.path.join(BENCH, "distributed.py"), "--variants", "1 process,ZeRO-2", "--nproc", "2",
           "--batch", str(p["zero_batch"]), "--seq", str(p["zero_seq"]), "--pre_seq_len", str(p["pre_seq_len"]),
           "--gc", "--steps", "5", "--warmup", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    body = proc.stdout if proc.returncode == 0 else f"failed ({proc.returncode}):\n```\n{proc.stderr[-1500:]}\n```"
    return "## ZeRO-2, 2 processes (bench/distributed.py)\n\n" + body


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs on CPU: checks that every section runs")
    parser.add_argument("--out", default=None, help="markdown file (default: bench/results/<date>-<device>-gpu_suite.md)")
    parser.add_argument("--sections", default="limits,train,memory,decode,zero")
    a = parser.parse_args(argv)

    import torch

    p = PROFILES["smoke" if a.smoke else "gpu"]
    device = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not a.smoke:
        log("no GPU: running the full-size profile on CPU would take hours; use --smoke")
        return 2
    short, described = device_line() if device.type == "cuda" else ("cpu", device_line()[1])
    out = a.out or os.path.join(ROOT, "bench", "results",
                                f"{datetime.date.today().isoformat()}-{short}-gpu_suite{'-smoke' if a.smoke else ''}.md")
    sections = [s for s in a.sections.split(",") if s]
    start = time.perf_counter()
    parts = [f"# GPU suite: {p['config']} geometry, {p['dtype']}{' (smoke run, tiny configs)' if a.smoke else ''}",
             "", f"Device: {described}. Command: `bash bench/gpu_suite.sh {shlex.join(argv or sys.argv[1:])}`"]
    limits = None
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as workdir:
        for name in sections:
            t0 = time.perf_counter()
            log(f"{name} ...")
            if name == "limits" or (limits is None and name == "train"):
                text, limits = limits_section(p, device)
                if name == "train":
                    text = ""
                else:
                    parts += ["", text]
                    log(f"{name} done in {time.perf_counter() - t0:.0f} s")
                    continue
            if name == "train":
                text = train_section(p, device, limits)
            elif name == "memory":
                text = memory_section(p, device, workdir)
            elif name == "decode":
                text = decode_section(p, device)
            elif name == "zero":
                text = zero_section(p, device)
            else:
                raise SystemExit(f"--sections: unknown section {name!r}")
            parts += ["", text]
            log(f"{name} done in {time.perf_counter() - t0:.0f} s")
    from tables import versions

    parts += ["", f"Total {time.perf_counter() - start:.0f} s. {versions('peft')}", ""]
    text = "\n".join(parts)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    log(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
