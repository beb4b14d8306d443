"""Peak memory and tokens/s of a prefix-tuning step on a bf16, INT8 and INT4 base, next to the planner's prediction.

    python bench/memory.py                                   # CPU: a small GLM, quick
    python bench/memory.py --config chatglm3-6b --device cuda --out bench/results/memory_chatglm3-6b.md

The base is a GLM with random weights built from a config (``--config``: a name below or a config.json). It is
saved once as bf16 safetensors (``--model_dir``, kept between runs) so that every variant loads it the way a user's
checkpoint is loaded: ``ptuning.model.load_base_model`` with ``--quantization_bit`` 4 (NF4) or 8 where asked.
Each variant (dtype × batch × gradient checkpointing) runs in its own child process, so its peak is its own:

  measured  CUDA: ``torch.cuda.max_memory_allocated()`` over the timed steps (weights included), plus the
            reserved and the whole-device use (``mem_get_info``, the CUDA context included) for reference.
            CPU: ``ptuning.memory.measure_step``: the bytes of the model and optimizer state plus the peak of the
            CPU allocator's own allocation events during one step.
  planned   ``ptuning.memory.plan`` for the same shapes, from the config alone.
  tokens/s  batch × (source + target) tokens per optimizer step, over ``--steps`` steps after one warm-up.

The step is the one training runs: the loss in ~32 MiB chunks of fp32 logits (``ptuning.model.chunked_target_loss``),
which the planner's loss term models.

Every row trains pre_seq_len 128 on source 64 + target 128 tokens per row by default (the issue's setting) with
AdamW; the table, the exact command and the device go to ``--out`` as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GEOMETRIES = {
    # for the test suite: seconds on a CPU
    "micro": dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
    # a CPU run: ChatGLM3's MLP ratio and GQA, with weights big enough against activations that a quantized
    # linear's dequantization (not the loss) sets the peak at --target_len 32, as it does for the 6B model
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1712, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64),
    "chatglm3-6b": dict(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
                        num_attention_heads=32, num_key_value_heads=2, head_dim=128),
}
QUANTIZATION = {"bf16": None, "int8": 8, "int4": 4}


def build_config(spec: str):
    from transformers import AutoConfig

    if spec in GEOMETRIES:
        config = AutoConfig.for_model("glm", pad_token_id=0, **GEOMETRIES[spec])
        config.architectures = ["GlmForCausalLM"]
    else:
        config = AutoConfig.from_pretrained(spec)
    config.dtype = "bfloat16"
    return config


def ensure_model(spec: str, model_dir: str, device: str) -> str:
    """Random bf16 weights for the config, saved once (initialised on the GPU when there is one: much faster)."""
    import torch
    from transformers import AutoModelForCausalLM

    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return model_dir
    config = build_config(spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(os.path.abspath(model_dir)) or ".")
    model.save_pretrained(staging)
    tokenizer().save_pretrained(staging)  # load_base_model loads one; the bench feeds random ids
    del model
    os.replace(staging, model_dir)
    return model_dir


def tokenizer():
    """A character tokenizer: enough for ``load_base_model``, which loads one next to the weights."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "</s>"] + [chr(c) for c in range(32, 127)])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def run_variant(args: dict) -> dict:
    """One row, in a fresh process."""
    import logging

    import torch

    from ptuning.memory import Setup, measure_step, plan
    from ptuning.model import attach_prefix, load_base_model

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "MatMul8bitLt: inputs will be cast" on every call
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    bits = QUANTIZATION[args["dtype"]]
    base, _ = load_base_model(args["model_dir"], torch_dtype="bf16", quantization_bit=bits)
    if bits is None:
        base.to(device)  # bitsandbytes places quantized weights itself
    model = attach_prefix(base, args["pre_seq_len"])
    if args["gc"]:
        model.gradient_checkpointing_enable()
    model.train()
    b, s, t = args["batch"], args["source_len"], args["target_len"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, (b, s + t), generator=g).to(device)
    labels = ids.clone()
    labels[:, :s] = -100
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(model.prefix_encoder.parameters(), lr=1e-3)

    def step():
        model(ids, mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up; creates the AdamW moments
    before, peak = measure_step(step, model, opt, device=device)
    row = dict(measured=before + peak)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        row.update(reserved=torch.cuda.max_memory_reserved(), device_used=total - free)
    sync()
    start = time.perf_counter()
    for _ in range(args["steps"]):
        step()
    sync()
    row["tokens_per_s"] = b * (s + t) * args["steps"] / (time.perf_counter() - start)
    setup = Setup(dtype="bf16", quantization_bit=bits, batch=b, source_len=s, target_len=t, loss_columns=t,
                  pre_seq_len=args["pre_seq_len"], gradient_checkpointing=args["gc"], device=device.type)
    result = plan(base.config, setup)
    row.update(planned=result.peak, phase=result.phase)
    return row


def table(rows: list[dict], cuda: bool) -> str:
    unit, scale = ("GiB", 1024**3) if max(r["measured"] for r in rows) >= 1024**3 else ("MiB", 1024**2)
    head = f"| base | batch | GC | measured {unit} | planned {unit} | planned phase | error | tokens/s |"
    sep = "|---|---:|---|---:|---:|---|---:|---:|"
    if cuda:
        head += f" reserved {unit} | device used {unit} |"
        sep += "---:|---:|"
    lines = [head, sep]
    for r in rows:
        error = 100 * (r["planned"] / r["measured"] - 1)
        line = (f"| {r['dtype']} | {r['batch']} | {'on' if r['gc'] else 'off'} | {r['measured'] / scale:.3f} | "
                f"{r['planned'] / scale:.3f} | {r['phase']} | {error:+.1f}% | {r['tokens_per_s']:.1f} |")
        if cuda:
            line += f" {r['reserved'] / scale:.3f} | {r['device_used'] / scale:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU: {platform.processor() or platform.machine()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", help=f"one of {', '.join(GEOMETRIES)}, or a config.json")
    parser.add_argument("--model_dir", default=None, help="where the random-weight model is kept (default: a cache "
                        "under .cache/bench-memory/)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtypes", default="bf16,int8,int4")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--gc", default="on,off", help="gradient checkpointing: on, off or on,off")
    parser.add_argument("--pre_seq_len", type=int, default=128)
    parser.add_argument("--source_len", type=int, default=64)
    parser.add_argument("--target_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_variant(json.loads(args.child))))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.config if args.config in GEOMETRIES else os.path.basename(os.path.dirname(os.path.abspath(args.config)))
    model_dir = args.model_dir or os.path.join(ROOT, ".cache", "bench-memory", name)
    os.makedirs(os.path.dirname(os.path.abspath(model_dir)), exist_ok=True)
    ensure_model(args.config, model_dir, device)
    rows = []
    for dtype in args.dtypes.split(","):
        for batch in (int(x) for x in args.batches.split(",")):
            for gc in (x == "on" for x in args.gc.split(",")):
                variant = dict(dtype=dtype, batch=batch, gc=gc, model_dir=model_dir, device=device,
                               threads=args.threads, pre_seq_len=args.pre_seq_len, source_len=args.source_len,
                               target_len=args.target_len, steps=args.steps)
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(variant)],
                                      capture_output=True, text=True, cwd=ROOT)
                result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not result:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    print(f"variant {dtype} batch {batch} gc {gc} failed", file=sys.stderr)
                    return 1
                rows.append({**variant, **json.loads(result[-1][len("RESULT "):])})
                print(f"{dtype} batch {batch} gc {'on' if gc else 'off'}: measured "
                      f"{rows[-1]['measured'] / 1024**2:.1f} MiB, planned {rows[-1]['planned'] / 1024**2:.1f} MiB",
                      flush=True)
    command = "python bench/memory.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = "\n".join([
        f"# Prefix-tuning step memory: {name}, pre_seq_len {args.pre_seq_len}, "
        f"{args.source_len} + {args.target_len} tokens",
        "",
        f"Command: `{command}`",
        f"Device: {device_name(device)}; torch {torch.__version__}; "
        f"bitsandbytes {__import__('bitsandbytes').__version__}; "
        f"{'peak = torch.cuda.max_memory_allocated()' if device == 'cuda' else 'peak = state + CPU allocator peak (ptuning.memory.measure_step)'}",
        "",
        table(rows, device == "cuda"),
        "",
    ])
    if device != "cuda":
        report += ("\nCPU run: the memory columns follow the same allocator-level accounting as on a GPU; tokens/s "
                   "is not a GPU proxy (bf16 matmuls are emulated on most CPUs, and 4/8-bit ones dequantize).\n")
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
