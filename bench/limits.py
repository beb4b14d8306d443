"""The machine's limits, measured in the run that quotes them: matmul FLOP/s for a model's own shapes, memory bandwidth,
and the FLOP / byte counts a training step or a decode step needs.

    python bench/limits.py --config .cache/smollm2-135m-instruct --rows 1,8,512    # print the limits table

A benchmark divides what it achieved by these: ``achieved FLOP/s / matmul peak`` (MFU against the peak this device
reaches on the same shapes, not a datasheet number) and ``achieved bytes/s / bandwidth`` (model bandwidth
utilisation). Timings are medians of several repeats; on a shared machine they are noisy, and only ratios measured in
one run mean much.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device):
    """The timer the benchmarks use: this process's CPU time on a CPU run with one thread (what the work cost,
    whatever other processes on a shared machine take from the cores meanwhile), wall time otherwise."""
    import torch

    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def clock_name(device) -> str:
    return "CPU time of this process (1 thread)" if clock(device) is time.process_time else "wall time"


def median_time(fn, device, repeats: int = 5, warmup: int = 1) -> float:
    """Median time of ``fn()`` in seconds by ``clock(device)`` (device synchronised around each call)."""
    now = clock(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = now()
        fn()
        _sync(device)
        times.append(now() - t0)
    return statistics.median(times)


def linear_shapes(config) -> list[tuple[int, int, int]]:
    """(in_features, out_features, count) of every matmul weight of one forward: attention and MLP projections per
    layer, then the LM head. Embedding lookups read rows, not matrices, and are not matmuls."""
    from ptuning.prefix import model_geometry

    g = model_geometry(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head")
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * g["hidden_size"]
    h, q, kv, layers = g["hidden_size"], heads * g["head_dim"], g["num_kv_heads"] * g["head_dim"], g["num_layers"]
    gated = getattr(text, "model_type", "") != "gpt2"
    shapes = [(h, q, layers), (h, kv, 2 * layers), (q, h, layers)]
    shapes += [(h, inter, 2 * layers)] if gated else [(h, inter, layers)]
    shapes += [(inter, h, layers), (h, g["vocab_size"], 1)]
    return shapes


def matmul_params(config) -> int:
    """Weights that take part in a matmul per token (attention, MLP, LM head)."""
    return sum(i * o * n for i, o, n in linear_shapes(config))


def matmul_peak(config, rows: int, dtype, device, repeats: int = 5) -> float:
    """FLOP/s of the model's own matmuls (every distinct ``[rows, in] @ [in, out]`` shape of one forward, each timed
    as many times as the forward runs it) on ``rows`` rows: the roof for a step built of those matmuls.

    Each distinct shape gets one weight, reused across its layers, so at small ``rows`` the weight may stay in cache:
    this peak is then an upper bound on what streaming distinct weights allows (see ``bandwidth``)."""
    import torch

    shapes = linear_shapes(config)
    g = torch.Generator(device="cpu").manual_seed(0)
    mats = [(torch.randn(rows, i, generator=g).to(device, dtype), torch.randn(i, o, generator=g).to(device, dtype), n)
            for i, o, n in shapes]

    def run():
        for x, w, n in mats:
            for _ in range(n):
                torch.mm(x, w)
    seconds = median_time(run, device, repeats)
    return 2 * rows * matmul_params(config) / seconds


def linear_only_seconds(model, rows: int, device, repeats: int = 5) -> float:
    """Time of every matmul layer of ``model`` (its own, distinct weights) applied once to ``rows`` rows: a decode
    step's matmuls alone, streaming the real weights through the same kernels; a step can be no faster."""
    import torch
    from transformers.pytorch_utils import Conv1D

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    dtype = next(model.parameters()).dtype
    width = {m: m.in_features if isinstance(m, torch.nn.Linear) else m.weight.shape[0] for m in layers}
    inputs = {w: torch.randn(rows, w, dtype=dtype, device=device) for w in set(width.values())}

    def run():
        with torch.no_grad():
            for m in layers:
                m(inputs[width[m]])
    return median_time(run, device, repeats)


def bandwidth(device, megabytes: int = 256, repeats: int = 5) -> dict:
    """Memory bandwidth in bytes/s: ``read`` (summing a buffer larger than any cache, what streaming weights needs)
    and ``copy`` (reading one buffer and writing another, both counted)."""
    import torch

    n = megabytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    read = median_time(lambda: src.sum(), device, repeats)
    copy = median_time(lambda: dst.copy_(src), device, repeats)
    return {"read": 4 * n / read, "copy": 2 * 4 * n / copy}


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes of keys and values one cached token holds across all layers."""
    from ptuning.prefix import model_geometry

    g = model_geometry(config)
    return 2 * g["num_layers"] * g["num_kv_heads"] * g["head_dim"] * dtype_bytes


def decode_step_bytes(config, weight_bytes: int, batch: int, context: int, dtype_bytes: int) -> int:
    """Bytes one decode step must read: every weight once, plus each row's cached keys/values."""
    return weight_bytes + batch * context * kv_bytes_per_token(config, dtype_bytes)


def decode_step_flops(config, batch: int, context: int) -> int:
    """FLOPs of one decode step: 2 per matmul weight per row, plus attention's QK^T and PV over ``context`` keys."""
    from ptuning.prefix import model_geometry

    g = model_geometry(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head")
    attention = 2 * 2 * g["num_layers"] * heads * g["head_dim"] * context
    return batch * (2 * matmul_params(config) + attention)


def train_step_flops(config, batch: int, seq: int, pre_seq_len: int, target_len: int | None = None) -> int:
    """FLOPs of one prefix-tuning step on a frozen base, by the ``4 N T`` count: forward (2 N T) plus the backward
    for input gradients only (2 N T; no weight gradients for a frozen base), the LM head on the ``target_len``
    target tokens of each row only (the chunked loss; all ``seq`` when None), and attention's QK^T and PV over
    ``pre_seq_len + causal`` keys counted the same way (forward + backward's two matmuls per product)."""
    from ptuning.prefix import model_geometry

    g = model_geometry(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head")
    tokens = batch * seq
    mean_keys = pre_seq_len + (seq + 1) / 2
    attention = 2 * 2 * g["num_layers"] * heads * g["head_dim"] * mean_keys * tokens
    head = g["hidden_size"] * g["vocab_size"]
    targets = batch * (seq if target_len is None else target_len)
    return int(4 * (matmul_params(config) - head) * tokens + 4 * head * targets + 3 * attention)


def gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="micro", help="a bench geometry name or a config dir")
    p.add_argument("--rows", default="1,8,512")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--megabytes", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    a = p.parse_args(argv)

    import torch

    from tables import markdown_table, versions
    from train_step import build_config

    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    config = build_config(a.config)
    bw = bandwidth(device, a.megabytes, a.repeats)
    rows = [[str(r), f"{matmul_peak(config, r, dtype, device, a.repeats) / 1e9:.1f}"]
            for r in (int(x) for x in a.rows.split(","))]
    print(f"config={a.config} device={device.type} dtype={a.dtype} threads={a.threads} clock: {clock_name(device)}; "
          f"matmul weights={matmul_params(config) / 1e6:.1f}M; memory read {gb(bw['read'])} GB/s, "
          f"copy {gb(bw['copy'])} GB/s ({a.megabytes} MiB buffers)\n")
    print(markdown_table(["rows", "matmul GFLOP/s (model's shapes)"], rows))
    print(f"\n{versions()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
