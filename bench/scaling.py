"""How our training step's time and peak memory grow with pre_seq_len, sequence length and batch size.

    python bench/scaling.py                       # tiny GLM geometry on CPU → table + bench/results/scaling.png
    python bench/scaling.py --config chatglm3-6b --dtype bf16 --gc   # on a GPU

Each point runs in its own child process (see train_step.py for how memory is measured). The sweep varies one
axis at a time around the defaults (pre_seq_len 16, source 256 + target 64, batch 4).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tables import markdown_table  # noqa: E402
from train_step import GEOMETRIES, measure, versions  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny-glm", help=f"one of {sorted(GEOMETRIES)} or a config dir")
    p.add_argument("--pre_seq_lens", default="16,32,64,128,256,512")
    p.add_argument("--seq_lens", default="80,160,320,640", help="source+target; target is a fifth")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--pre_seq_len", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=320)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--gc", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scaling.png"))
    a = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def point(pre_seq_len, seq_len, batch):
        target = max(1, seq_len // 5)
        args = dict(config=a.config, batch=batch, source_len=seq_len - target, target_len=target,
                    pre_seq_len=pre_seq_len, dtype=a.dtype, gc=a.gc, steps=a.steps, warmup=1, threads=a.threads,
                    device=device, timeout=1800)
        return measure(args, ["ours"])[0]

    sweeps = {
        "pre_seq_len": [(v, point(v, a.seq_len, a.batch)) for v in ints(a.pre_seq_lens)],
        "seq_len": [(v, point(a.pre_seq_len, v, a.batch)) for v in ints(a.seq_lens)],
        "batch": [(v, point(a.pre_seq_len, a.seq_len, v)) for v in ints(a.batches)],
    }
    rows = [[axis, str(value), f"{r['median']:.4f}", f"{r['tokens'] / r['median']:.0f}", f"{r['peak'] / 2**20:.1f}"]
            for axis, points in sweeps.items() for value, r in points]
    lines = [f"config={a.config} device={device} dtype={a.dtype} gc={a.gc} defaults: pre_seq_len={a.pre_seq_len} "
             f"seq_len={a.seq_len} batch={a.batch}", "",
             markdown_table(["axis", "value", "step median (s)", "tokens/s", "peak mem (MiB)"], rows)]
    print("\n".join(lines) + f"\n\n{versions()}\ncommand: python bench/scaling.py {' '.join(argv or sys.argv[1:])}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for col, (axis, points) in enumerate(sweeps.items()):
        xs = [v for v, _ in points]
        axes[0][col].plot(xs, [r["median"] for _, r in points], marker="o")
        axes[1][col].plot(xs, [r["peak"] / 2**20 for _, r in points], marker="o", color="tab:red")
        axes[0][col].set_title(f"step time vs {axis}")
        axes[1][col].set_xlabel(axis)
        axes[0][col].set_ylabel("seconds")
        axes[1][col].set_ylabel("peak MiB")
    fig.suptitle(f"ptuning step scaling ({a.config}, {device}, {a.dtype})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.png)), exist_ok=True)
    fig.savefig(a.png, dpi=100)
    print(f"plot: {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
