"""Training-step benchmark: ptuning's prefix step against PEFT prefix tuning on the same base, data and prefix.

    python bench/train_step.py                       # tiny GLM geometry, 65k vocab, prompt 256 + target 64, CPU
    python bench/train_step.py --config chatglm3-6b --dtype bf16 --batch 4 --source_len 64 --target_len 128 \
        --pre_seq_len 128 --gc                       # on a GPU

Every variant runs in its own child process (same seed, same random weights and batch), so peak memory is that
variant's alone: CUDA max-allocated on GPU; on CPU the peak resident set size during the timed steps (the kernel's
VmHWM, reset through /proc/self/clear_refs just before them) minus the resident size at that moment. Step 1's loss
of every variant must equal PEFT's, or the script fails: a faster step that computes something else is no result.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GEOMETRIES = {
    # smoke-test size for the test suite
    "micro": dict(model_type="glm", vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # tiny GLM geometry with a real-size vocabulary: the LM head dominates, as in real chat models
    "tiny-glm": dict(model_type="glm", vocab_size=65024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "chatglm3-6b": dict(model_type="glm", vocab_size=65024, hidden_size=4096, intermediate_size=13696,
                        num_hidden_layers=28, num_attention_heads=32, num_key_value_heads=2, head_dim=128),
    "glm4-9b": dict(model_type="glm4", vocab_size=151552, hidden_size=4096, intermediate_size=13696,
                    num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2, head_dim=128),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64),
}

# name → (implementation, options): each of our levers switched off once shows what it buys.
VARIANTS = {
    "peft": ("peft", {}),
    "ours": ("ours", {}),
    "ours-full-logits": ("ours", {"full_logits": True}),
    "ours-eager-attn": ("ours", {"attn": "eager"}),
}


def build_config(spec: str):
    from transformers import AutoConfig

    if spec in GEOMETRIES:
        fields = dict(GEOMETRIES[spec])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        config = AutoConfig.from_pretrained(spec)
    config.pad_token_id = 0
    return config


def peak_probe(device):
    """(start, peak-minus-start) memory probes in bytes for the device."""
    import torch

    if device.type == "cuda":
        def start():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def peak(base):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        return start, peak

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def start():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")

    def peak(base):
        return status("VmHWM") - base
    return start, peak


def run_variant(name: str, args: dict, queue) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args["threads"])
    impl, options = VARIANTS[name]
    device = torch.device(args["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args["dtype"]]
    config = build_config(args["config"])
    config._attn_implementation = options.get("attn", "sdpa")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    base.config.architectures = [type(base).__name__]
    g = torch.Generator().manual_seed(1)
    b, s, t = args["batch"], args["source_len"], args["target_len"]
    input_ids = torch.randint(3, config.vocab_size, (b, s + t), generator=g).to(device)
    labels = input_ids.clone()
    labels[:, :s] = -100
    mask = torch.ones_like(input_ids)

    if impl == "ours":
        from ptuning.model import attach_prefix

        model = attach_prefix(base, args["pre_seq_len"])
        weight = model.prefix_encoder.embedding.weight
        if args["gc"]:
            model.activation_checkpointing_enable()

        def step():
            if options.get("full_logits"):
                logits = model(input_ids, mask).logits
                return torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            return model(input_ids, mask, labels=labels).loss
    else:
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args["pre_seq_len"]))
        weight = model.prompt_encoder.default.embedding.weight
        if args["gc"]:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def step():
            return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss

    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    opt = torch.optim.AdamW([weight], lr=1e-3)
    model.train()

    def one():
        loss = step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = one()
    for _ in range(args["warmup"]):
        one()
    start, peak = peak_probe(device)
    base_bytes = start()
    times = []
    for _ in range(args["steps"]):
        t0 = time.perf_counter()
        one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    queue.put(dict(name=name, first_loss=first_loss, median=statistics.median(times), min=min(times),
                   peak=peak(base_bytes), tokens=b * (s + t)))


def measure(args: dict, names) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = []
    for name in names:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_variant, args=(name, args, queue))
        proc.start()
        result = queue.get(timeout=args["timeout"])
        proc.join()
        results.append(result)
    return results


def table(results: list[dict], args: dict) -> str:
    ref = next(r for r in results if r["name"] == "peft")
    lines = [
        f"config={args['config']} device={args['device']} dtype={args['dtype']} batch={args['batch']} "
        f"source={args['source_len']} target={args['target_len']} pre_seq_len={args['pre_seq_len']} gc={args['gc']} "
        f"steps={args['steps']} threads={args['threads']}",
        "",
        "| variant | step median (s) | step min (s) | train tokens/s | peak mem (MiB) | time vs PEFT | mem vs PEFT | step-1 loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['median']:.4f} | {r['min']:.4f} | {r['tokens'] / r['median']:.0f} | "
            f"{r['peak'] / 2**20:.1f} | {r['median'] / ref['median']:.2f}x | "
            f"{(r['peak'] / ref['peak']) if ref['peak'] else float('nan'):.2f}x | {r['first_loss']:.6f} |"
        )
    return "\n".join(lines)


def versions() -> str:
    import peft
    import torch
    import transformers

    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, {platform.machine()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny-glm", help=f"one of {sorted(GEOMETRIES)} or a config dir")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--source_len", type=int, default=256)
    p.add_argument("--target_len", type=int, default=64)
    p.add_argument("--pre_seq_len", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--gc", action="store_true", help="gradient checkpointing in every variant")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--device", default=None)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (peft is always run)")
    p.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    p.add_argument("--timeout", type=float, default=1800)
    a = p.parse_args(argv)
    import torch

    args = vars(a)
    args["device"] = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = ["peft"] + [n for n in a.variants.split(",") if n and n != "peft"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    results = measure(args, names)
    ref_loss = results[0]["first_loss"]
    text = table(results, args) + f"\n\n{versions()}\ncommand: python bench/train_step.py {' '.join(argv or sys.argv[1:])}\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    tolerance = 1e-4 if a.dtype == "fp32" else 2e-2
    bad = [r["name"] for r in results if abs(r["first_loss"] - ref_loss) > tolerance * max(1.0, abs(ref_loss))]
    if bad:
        print(f"step-1 loss differs from PEFT's for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
