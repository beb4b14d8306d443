"""Decode benchmark: greedy tokens/s of ``generate()`` and of ptuning.decode's static-cache loop, with a prefix and
on the bare base, against the machine's limits measured in the same run.

    python bench/generate.py                                        # micro GLM geometry on CPU
    python bench/generate.py --config .cache/smollm2-135m-instruct  # the bundled SmolLM2's geometry
    python bench/generate.py --config chatglm3-6b --dtype bf16 --pre_seq_len 128 --new_tokens 128 --batches 1,8,32

Every run uses the same random weights and prompts and generates exactly ``--new_tokens`` tokens (``min_new_tokens``),
and the fast loop's ids must equal ``generate()``'s (the script fails otherwise). ``decode tokens/s`` is the decode
steps alone: the time of a run with ``--new_tokens`` minus that of a run with 1 (prompt prefill and first token),
over ``--new_tokens - 1`` steps; ``with prefill`` divides all tokens by the whole run. ``model's matmuls alone /
step`` is the time of the model's own matmul layers applied to the batch's rows, nothing else, over a step's time:
near 1, the step is its matmul kernels (and their bandwidth), not Python or cache overhead. Paths run interleaved, and on a
1-thread CPU run they are timed by this process's CPU time, so other jobs on a shared machine inflate them less. A decode step reads every matmul
weight once plus each row's cached keys/values: ``bytes/s`` is that count times steps per second, against the memory
read bandwidth measured here (the batch-1 roof); ``GFLOP/s`` is 2 FLOPs per weight per row plus attention, against the
matmul peak measured here on the model's own shapes at the same row count (the large-batch roof).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from limits import bandwidth, clock, clock_name, decode_step_bytes, linear_only_seconds, decode_step_flops, matmul_params, matmul_peak  # noqa: E402
from tables import markdown_table, ratio, versions  # noqa: E402
from train_step import GEOMETRIES, build_config  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def timed_round_robin(fns: dict, repeats: int, device) -> dict:
    """{name: (median seconds, last result)}: every ``fn`` once to warm up, then ``repeats`` rounds of each in turn
    (interleaved, so drift in the machine's load hits every path alike), timed by ``limits.clock``."""
    import torch

    now = clock(device)
    results = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = now()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(now() - t0)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


def build(config_spec: str, dtype_name: str, pre_seq_len: int, device, weights: bool = False):
    """(base, prefix model, config): random weights from the config (or the checkpoint's own with ``weights``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ptuning.model import attach_prefix

    dtype = getattr(torch, DTYPES[dtype_name])
    config = build_config(config_spec)
    torch.manual_seed(0)
    if weights:
        base = AutoModelForCausalLM.from_pretrained(config_spec, dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base = base.to(device).eval()
    base.config.architectures = [type(base).__name__]
    model = attach_prefix(base, pre_seq_len).eval()
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return base, model, config


def measure(args: dict) -> dict:
    """Run every (batch, path) cell; returns the limits, one row dict per cell, and the header fields."""
    import torch

    from ptuning import decode

    torch.set_num_threads(args["threads"])
    device = torch.device(args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    base, model, config = build(args["config"], args["dtype"], args["pre_seq_len"], device, args.get("weights", False))
    dtype = base.get_input_embeddings().weight.dtype
    elt = torch.finfo(dtype).bits // 8
    bw = bandwidth(device, args.get("megabytes", 256), args["repeats"])
    weight_bytes = matmul_params(config) * elt
    new = args["new_tokens"]
    modes = args["modes"]
    results = []
    for b in args["batches"]:
        peak = matmul_peak(config, b, dtype, device, args["repeats"])
        matmuls = linear_only_seconds(base, b, device, args["repeats"])
        ids = torch.randint(3, config.vocab_size, (b, args["prompt_len"]), generator=torch.Generator().manual_seed(b))
        ids = ids.to(device)
        mask = torch.ones_like(ids)
        cells = {}
        for prefixed in (False, True):
            target = model if prefixed else base
            context = (args["pre_seq_len"] if prefixed else 0) + args["prompt_len"] + new / 2
            step_bytes = decode_step_bytes(config, weight_bytes, b, int(context), elt)
            step_flops = decode_step_flops(config, b, int(context))
            paths = {}
            for n in (1, new):  # the prefill + first token alone, then with new - 1 decode steps more
                kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                paths[("generate()", n)] = lambda kw=kw: target.generate(ids, attention_mask=mask, **kw)
                paths.update({(f"fast {m}", n): (lambda m=m, kw=kw: decode.generate(target, ids, mask, mode=m, **kw))
                              for m in modes})
            with torch.no_grad():
                timings = timed_round_robin(paths, args["repeats"], device)
            reference = timings[("generate()", new)][1]
            for path in ["generate()"] + [f"fast {m}" for m in modes]:
                total, out = timings[(path, new)]
                if not torch.equal(out, reference):
                    raise SystemExit(f"batch {b} {path}: ids differ from generate()'s")
                steps = max(total - timings[(path, 1)][0], 1e-9) / (new - 1)  # one decode step, prefill excluded
                print(f"batch {b} {path} {'prefix' if prefixed else 'base'}: {b / steps:.1f} decode tokens/s",
                      file=sys.stderr, flush=True)
                cells[(path, prefixed)] = steps
                results.append(dict(batch=b, path=path, prefix=prefixed, seconds=steps, tokens_per_s=b / steps,
                                    end_to_end=b * new / total, bytes_per_s=step_bytes / steps,
                                    flops_per_s=step_flops / steps, peak=peak, matmuls=matmuls,
                                    bound_tokens_per_s=b * bw["read"] / step_bytes))
        for r in results:
            if r["batch"] == b:
                r["vs_generate"] = cells[("generate()", r["prefix"])] / r["seconds"]
                r["prefix_cost"] = r["seconds"] / cells[(r["path"], False)] if r["prefix"] else 1.0
    return dict(bandwidth=bw, weight_bytes=weight_bytes, rows=results, device=device.type, config=config,
                clock=clock_name(device))


def table(measured: dict) -> str:
    rows = [[str(r["batch"]), r["path"], "prefix" if r["prefix"] else "base", f"{r['tokens_per_s']:.1f}",
             f"{r['end_to_end']:.1f}",
             f"{r['vs_generate']:.2f}x", f"{r['prefix_cost']:.2f}x", f"{r['bytes_per_s'] / 1e9:.3g}",
             ratio(r["bytes_per_s"], measured["bandwidth"]["read"]), f"{r['bound_tokens_per_s']:.1f}",
             f"{r['flops_per_s'] / 1e9:.3g}", ratio(r["flops_per_s"], r["peak"]), ratio(r["matmuls"], r["seconds"])]
            for r in measured["rows"]]
    return markdown_table(["batch", "path", "model", "decode tokens/s", "with prefill tokens/s",
                           "step speed vs generate()", "step time vs base",
                           "GB/s read", "of bandwidth", "bandwidth-bound tokens/s", "GFLOP/s", "of matmul peak",
                           "model's matmuls alone / step"], rows)


def targets(measured: dict, path: str) -> list[str]:
    """The issue's targets for one path: batch-1 share of the bandwidth bound, batch-8 speed-up, prefix cost."""
    rows = {(r["batch"], r["prefix"]): r for r in measured["rows"] if r["path"] == path}
    lines = []
    one = rows.get((1, True))
    if one:
        lines.append(f"{path}: batch 1 with prefix at {one['tokens_per_s'] / one['bound_tokens_per_s']:.2f} of the "
                     f"bandwidth bound ({one['tokens_per_s']:.1f} of {one['bound_tokens_per_s']:.1f} tokens/s; "
                     f"target 0.70)")
    if one and (8, True) in rows:
        lines.append(f"{path}: batch 8 = {rows[(8, True)]['tokens_per_s'] / one['tokens_per_s']:.2f}x batch 1 "
                     f"tokens/s (target 4x)")
    costs = [r["prefix_cost"] for (b, p), r in rows.items() if p]
    if costs:
        lines.append(f"{path}: prefix time vs bare base {', '.join(f'{c:.2f}x' for c in costs)} (target <= 1.05x)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny-glm", help=f"one of {sorted(GEOMETRIES)} or a config dir")
    p.add_argument("--weights", action="store_true", help="load the checkpoint's weights (--config is a model dir)")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--pre_seq_len", type=int, default=16)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--modes", default="auto", help=f"fast-loop modes to time, comma-separated, of {'/'.join(['auto', 'eager', 'static', 'compile', 'cuda_graph'])}")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--megabytes", type=int, default=256, help="buffer size of the bandwidth measurement")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    args = dict(vars(a), batches=[int(x) for x in a.batches.split(",")], modes=[m for m in a.modes.split(",") if m])
    measured = measure(args)
    bw = measured["bandwidth"]
    lines = [f"config={a.config} device={measured['device']} dtype={a.dtype} prompt={a.prompt_len} "
             f"new={a.new_tokens} pre_seq_len={a.pre_seq_len} threads={a.threads} repeats={a.repeats} (medians, paths "
             f"interleaved; clock: {measured['clock']})",
             f"limits measured in this run: memory read {bw['read'] / 1e9:.1f} GB/s (copy {bw['copy'] / 1e9:.1f}); "
             f"matmul weights {measured['weight_bytes'] / 2**20:.0f} MiB read per decode step; matmul peak per batch "
             f"size in the 'of matmul peak' column", "", table(measured), ""]
    for path in sorted({r["path"] for r in measured["rows"]}):
        lines += targets(measured, path)
    text = "\n".join(lines) + f"\n\n{versions()}\ncommand: python bench/generate.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
