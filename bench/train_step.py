"""Training-step benchmark: ptuning's prefix step against PEFT prefix tuning on the same base, data and prefix.

    python bench/train_step.py                       # tiny GLM geometry, 65k vocab, prompt 256 + target 64, CPU
    python bench/train_step.py --config chatglm3-6b --dtype bf16 --batch 4 --source_len 64 --target_len 128 \
        --pre_seq_len 128 --gc                       # on a GPU

Every variant runs in its own child process (same seed, same random weights and batch), so peak memory is that
variant's alone: CUDA max-allocated on GPU; on CPU the peak resident set size during the timed steps (the kernel's
VmHWM, reset through /proc/self/clear_refs just before them) minus the resident size at that moment. Step 1's loss
of every variant must equal PEFT's, or the script fails: a faster step that computes something else is no result.

Each `ours-*` variant switches one lever of our step off (or a cost-saving option on) to show what it buys:
`ours-unchunked-ce` (LM head and fp32 log-probs of the batch's target columns at once instead of per-row target
tokens in chunks), `ours-full-logits` (LM head and loss over every position), `ours-eager-attn` (eager attention instead
of SDPA), `ours-gc` (gradient checkpointing), `ours-bf16-weights` (bf16 base, fp32 prefix master weights),
`ours-bf16-autocast` (fp32 base under bf16 autocast) and, with `--prefix_projection`, `ours-proj-per-row` (the prefix MLP
applied to the embedding expanded to every batch row instead of once per step). `--length_grouping` adds a second
table: one epoch of mixed-length rows batched at random vs by transformers' `LengthGroupedSampler` (what
`--train_sampling_strategy group_by_length` uses), with the padding each leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import queue as queue_module
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GEOMETRIES = {
    # smoke-test size for the test suite
    "micro": dict(model_type="glm", vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # tiny GLM geometry with a real-size vocabulary: the LM head dominates, as in real chat models
    "tiny-glm": dict(model_type="glm", vocab_size=65024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    # GLM-4's 151k vocabulary on the tiny body: where the LM head and the fp32 cross-entropy matter most
    "tiny-glm4": dict(model_type="glm4", vocab_size=151552, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
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
    "ours-unchunked-ce": ("ours", {"loss_chunk_rows": 0}),
    "ours-full-logits": ("ours", {"full_logits": True}),
    "ours-eager-attn": ("ours", {"attn": "eager"}),
    "ours-gc": ("ours", {"gc": True}),
    "ours-bf16-weights": ("ours", {"dtype": "bf16"}),
    "ours-bf16-autocast": ("ours", {"autocast": "bf16"}),
    "ours-proj-per-row": ("ours", {"proj_per_row": True}),
}
# one epoch of mixed-length rows (--length_grouping): batches drawn at random vs grouped by length
MIXED_VARIANTS = ("ours-mixed-random", "ours-mixed-grouped")
DTYPES = ("fp32", "bf16", "fp16")
# measure()'s arguments that callers such as bench/scaling.py may leave out
OPTIONAL_ARGS = dict(prefix_projection=False, prefix_hidden_size=512, mixed_batches=16)


def default_variants(gc: bool, dtype: str, projection: bool) -> list[str]:
    """Every lever that means something for these flags."""
    names = list(VARIANTS)
    if gc:
        names.remove("ours-gc")
    if dtype != "fp32":
        names = [n for n in names if not n.startswith("ours-bf16")]
    if not projection:
        names.remove("ours-proj-per-row")
    return names


def variant_dtype(name: str, args: dict) -> str:
    return VARIANTS.get(name, ("", {}))[1].get("dtype", args["dtype"])


def loss_tolerance(name: str, args: dict) -> float:
    options = VARIANTS.get(name, ("", {}))[1]
    low = variant_dtype(name, args) != "fp32" or args["dtype"] != "fp32" or "autocast" in options
    return 2e-2 if low else 1e-4


def build_config(spec: str):
    from transformers import AutoConfig

    if spec in GEOMETRIES:
        fields = dict(GEOMETRIES[spec], pad_token_id=0)  # GLM's default pad id lies outside a scaled-down vocabulary
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


def build_model(impl: str, options: dict, args: dict, device):
    """(model, trainable prefix parameters, base) with the same random weights in every process."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[options.get("dtype", args["dtype"])]
    config = build_config(args["config"])
    config._attn_implementation = options.get("attn", "sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU when there is one: seconds instead of minutes for 6B
        base = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    base.config.architectures = [type(base).__name__]
    if impl == "ours":
        from ptuning.model import attach_prefix

        model = attach_prefix(base, args["pre_seq_len"], prefix_projection=args["prefix_projection"],
                              prefix_hidden_size=args["prefix_hidden_size"])
        if "loss_chunk_rows" in options:
            model.loss_chunk_rows = options["loss_chunk_rows"]
        if args["gc"] or options.get("gc"):
            model.activation_checkpointing_enable()
        if options.get("proj_per_row"):
            per_row_projection(model.prefix_encoder)
        params = list(model.prefix_encoder.parameters())
    else:
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(base, PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=args["pre_seq_len"], prefix_projection=args["prefix_projection"],
            encoder_hidden_size=args["prefix_hidden_size"]))
        params = list(model.prompt_encoder.default.parameters())
        # No gradient checkpointing here even under --gc: transformers 5 drops PEFT's past_key_values in
        # checkpointed layers and attention then fails on the prefix-length mask (the table says so).
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:  # same prefix in every variant (PEFT's projection MLP has other shapes: own values)
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, params, base


def per_row_projection(encoder) -> None:
    """Lever off: the prefix MLP runs on the embedding expanded to every batch row (as PEFT's prompt encoder does)."""
    from ptuning.prefix import split_key_values

    if not encoder.config.prefix_projection:
        raise SystemExit("ours-proj-per-row needs --prefix_projection")

    def key_values(batch_size, dtype, repeats=1):
        rows = batch_size * repeats
        flat = encoder.trans(encoder.embedding.weight.unsqueeze(0).expand(rows, -1, -1))
        return split_key_values(flat, encoder.config, rows, dtype, encoder.dropout)
    encoder.key_values = key_values


def make_step(impl: str, options: dict, model, device):
    """loss(input_ids, mask, labels, num_items) for one forward of the variant, under its autocast if any."""
    import torch

    autocast = options.get("autocast")
    context = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def step(input_ids, mask, labels, num_items=None):
        with context():
            if impl == "peft":
                out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
                return out.loss
            if options.get("full_logits"):
                logits = model(input_ids, mask).logits
                return torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            return model(input_ids, mask, labels=labels, num_items_in_batch=num_items).loss
    return step


def run_variant(name: str, args: dict, queue) -> None:
    import torch

    torch.set_num_threads(args["threads"])
    impl, options = VARIANTS[name] if name in VARIANTS else ("ours", {})
    device = torch.device(args["device"])
    model, params, base = build_model(impl, options, args, device)
    step = make_step(impl, options, model, device)
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()

    def one(batch):
        loss = step(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    if name in MIXED_VARIANTS:
        queue.put(run_mixed(name, args, one, step, base.config, device))
        return
    g = torch.Generator().manual_seed(1)
    b, s, t = args["batch"], args["source_len"], args["target_len"]
    input_ids = torch.randint(3, base.config.vocab_size, (b, s + t), generator=g).to(device)
    labels = input_ids.clone()
    labels[:, :s] = -100
    batch = (input_ids, torch.ones_like(input_ids), labels)

    first_loss = one(batch)
    for _ in range(args["warmup"]):
        one(batch)
    from limits import clock

    now = clock(device)  # CPU time of this process on a 1-thread CPU run: robust to other jobs on a shared machine
    start, peak = peak_probe(device)
    base_bytes = start()
    times = []
    for _ in range(args["steps"]):
        t0 = now()
        one(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(now() - t0)
    queue.put(dict(name=name, first_loss=first_loss, median=statistics.median(times), min=min(times),
                   peak=peak(base_bytes), tokens=b * (s + t)))


def mixed_rows(args: dict, vocab_size: int):
    """Rows of random ids whose prompt and target lengths are uniform in [1/8, 1] of --source_len / --target_len."""
    import torch

    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(args["batch"] * args["mixed_batches"]):
        s = int(torch.randint(max(1, args["source_len"] // 8), args["source_len"] + 1, (), generator=g))
        t = int(torch.randint(max(1, args["target_len"] // 8), args["target_len"] + 1, (), generator=g))
        ids = torch.randint(3, vocab_size, (s + t,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * s + ids[s:]})
    return rows


def mixed_batches(name: str, rows: list, batch_size: int) -> list[list[int]]:
    """Index batches: a random permutation, or transformers' LengthGroupedSampler (group_by_length)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(4)
    if name == "ours-mixed-grouped":
        order = list(LengthGroupedSampler(batch_size, lengths=[len(r["input_ids"]) for r in rows], generator=g))
    else:
        order = torch.randperm(len(rows), generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def run_mixed(name: str, args: dict, one, step, config, device) -> dict:
    """One epoch over the same mixed-length rows; padding, mean step time, real tokens/s and the summed token loss
    under the initial prefix (which must not depend on how the rows were batched)."""
    import torch
    from ptuning.data import Collator

    rows = mixed_rows(args, config.vocab_size)
    collate = Collator(pad_token_id=config.pad_token_id)
    batches = []
    for idx in mixed_batches(name, rows, args["batch"]):
        b = collate([rows[i] for i in idx])
        batches.append((b["input_ids"].to(device), b["attention_mask"].to(device), b["labels"].to(device)))
    with torch.no_grad():
        summed = sum(step(*b, num_items=1).item() for b in batches)
    one(batches[0])  # warm-up
    start, peak = peak_probe(device)
    base_bytes = start()
    t0 = time.perf_counter()
    for b in batches:
        one(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    padded = sum(b[0].numel() for b in batches)
    real = sum(int(b[1].sum()) for b in batches)
    return dict(name=name, first_loss=summed, steps=len(batches), mean=elapsed / len(batches), padded=padded,
                real=real, peak=peak(base_bytes))


def measure(args: dict, names) -> list[dict]:
    """Run each variant in a fresh process; a process that dies fails the run instead of hanging it.

    On Linux the processes fork from a server that has imported torch, transformers and peft once (nothing run, no
    thread pool or CUDA context yet), so each variant starts in a second instead of re-importing them; elsewhere they
    are spawned."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        preload = ["torch", "transformers", "peft", "ptuning.model", "ptuning.data", "transformers.trainer_pt_utils"]
        model_type = GEOMETRIES.get(args["config"], {}).get("model_type")
        if model_type:
            preload.append(f"transformers.models.{model_type}.modeling_{model_type}")
        ctx.set_forkserver_preload(preload)
    else:
        ctx = mp.get_context("spawn")
    args = {**OPTIONAL_ARGS, **args}
    results = []
    for name in names:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_variant, args=(name, args, queue))
        proc.start()
        deadline = time.monotonic() + args["timeout"]
        while True:
            try:
                results.append(queue.get(timeout=1))
                break
            except queue_module.Empty:
                if not proc.is_alive():
                    try:
                        results.append(queue.get(timeout=5))
                        break
                    except queue_module.Empty:
                        raise SystemExit(f"variant {name}: its process exited with {proc.exitcode} before reporting")
                if time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit(f"variant {name}: no result within {args['timeout']:.0f} s")
        proc.join()
    return results


def header(args: dict) -> str:
    return (f"config={args['config']} device={args['device']} dtype={args['dtype']} batch={args['batch']} "
            f"source={args['source_len']} target={args['target_len']} pre_seq_len={args['pre_seq_len']} "
            f"prefix_projection={args['prefix_projection']} gc={args['gc']} steps={args['steps']} "
            f"threads={args['threads']}")


def step_flops(args: dict) -> int:
    """FLOPs of one step by ``bench/limits.train_step_flops`` (4 N T, LM head on the target tokens only)."""
    from limits import train_step_flops

    return train_step_flops(build_config(args["config"]), args["batch"], args["source_len"] + args["target_len"],
                            args["pre_seq_len"], args["target_len"])


def matmul_roof(args: dict) -> float:
    """FLOP/s of the model's own matmul shapes on one step's token rows, measured now (``bench/limits``)."""
    import torch
    from limits import matmul_peak

    torch.set_num_threads(args["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args["dtype"]]
    rows = args["batch"] * (args["source_len"] + args["target_len"])
    return matmul_peak(build_config(args["config"]), rows, dtype, torch.device(args["device"]), repeats=3)


def table(results: list[dict], args: dict, peak: float | None = None) -> str:
    """The variants' table; with ``peak`` (matmul FLOP/s on the same shapes) each row's achieved FLOP/s and share."""
    from tables import markdown_table, ratio

    ref = next(r for r in results if r["name"] == "peft")
    notes = []
    rows = []
    flops = step_flops(args)
    if peak:
        notes.append(f"One step is {flops / 1e9:.2f} GFLOP (4 N T: forward + input-gradient backward of the frozen "
                     f"base, LM head on target tokens only, attention included); the model's own matmul shapes on "
                     f"{args['batch'] * (args['source_len'] + args['target_len'])} rows reach {peak / 1e9:.1f} "
                     f"GFLOP/s here, measured in this run (bench/limits.py).")
    for r in results:
        name = r["name"]
        if name == "peft" and args["gc"]:
            name = "peft (no GC)"
            notes.append("peft runs without gradient checkpointing: transformers 5 drops PEFT's past_key_values "
                         "inside checkpointed layers and its attention then fails on the prefix-length mask.")
        achieved = [f"{flops / r['median'] / 1e9:.3g}", ratio(flops / r["median"], peak)] if peak else []
        rows.append([name, f"{r['median']:.4f}", f"{r['min']:.4f}", f"{r['tokens'] / r['median']:.0f}",
                     f"{r['peak'] / 2**20:.1f}", ratio(r["median"], ref["median"]), ratio(r["peak"], ref["peak"]),
                     *achieved, f"{r['first_loss']:.6f}"])
    if args["prefix_projection"]:
        notes.append("With --prefix_projection PEFT's MLP takes kv_dim-wide embeddings (ours: hidden_size-wide, as "
                     "ChatGLM), so its weights differ and step-1 losses are checked against ours.")
    body = markdown_table(["variant", "step median (s)", "step min (s)", "train tokens/s", "peak mem (MiB)",
                           "time vs PEFT", "mem vs PEFT", *(["GFLOP/s", "of matmul peak"] if peak else []),
                           "step-1 loss"], rows)
    return "\n".join([header(args), *notes, "", body])


def mixed_table(results: list[dict], args: dict) -> str:
    from tables import markdown_table, ratio

    ref = results[0]
    rows = [[r["name"], str(r["steps"]), str(r["padded"]), f"{1 - r['real'] / r['padded']:.3f}", f"{r['mean']:.4f}",
             f"{r['real'] / (r['mean'] * r['steps']):.0f}", f"{r['peak'] / 2**20:.1f}", ratio(r["mean"], ref["mean"]),
             f"{r['first_loss']:.4f}"] for r in results]
    return "\n".join([
        f"Length grouping: {args['batch'] * args['mixed_batches']} rows, prompt uniform in "
        f"[{max(1, args['source_len'] // 8)}, {args['source_len']}], target uniform in "
        f"[{max(1, args['target_len'] // 8)}, {args['target_len']}], batch {args['batch']}, one epoch; padding is "
        f"to each batch's longest row (ptuning.data.Collator); summed token loss is under the initial prefix.",
        "",
        markdown_table(["variant", "steps", "tokens incl. padding", "padding fraction", "step mean (s)",
                        "real tokens/s", "peak mem (MiB)", "time vs random", "summed token loss"], rows),
    ])


def versions() -> str:
    from tables import versions as library_versions

    return f"{library_versions('peft')}, {platform.machine()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny-glm", help=f"one of {sorted(GEOMETRIES)} or a config dir")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--source_len", type=int, default=256)
    p.add_argument("--target_len", type=int, default=64)
    p.add_argument("--pre_seq_len", type=int, default=16)
    p.add_argument("--prefix_projection", action="store_true", help="the prefix MLP in every variant (PEFT's too)")
    p.add_argument("--prefix_hidden_size", type=int, default=512)
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--gc", action="store_true", help="gradient checkpointing in every variant of ours (PEFT's "
                                                     "prefix breaks under it in transformers 5: it runs without)")
    p.add_argument("--length_grouping", action="store_true", help="add the mixed-length epoch table: random vs "
                                                                  "length-grouped batches")
    p.add_argument("--mixed_batches", type=int, default=16, help="batches in the mixed-length epoch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--device", default=None)
    p.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(VARIANTS) +
                   " (peft is always run; default: every lever that applies to the other flags)")
    p.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    p.add_argument("--timeout", type=float, default=1800)
    a = p.parse_args(argv)
    import torch

    args = vars(a)
    args["device"] = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = a.variants.split(",") if a.variants is not None else default_variants(a.gc, a.dtype, a.prefix_projection)
    names = ["peft"] + [n for n in chosen if n and n != "peft"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if "ours-proj-per-row" in names and not a.prefix_projection:
        p.error("ours-proj-per-row needs --prefix_projection")
    results = measure(args, names)
    text = table(results, args, matmul_roof(args))
    mixed = measure(args, MIXED_VARIANTS) if a.length_grouping else []
    if mixed:
        text += "\n\n" + mixed_table(mixed, args)
    text += f"\n\n{versions()}\ncommand: python bench/train_step.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    # Step-1 losses must agree with PEFT's (with ours' when PEFT's projection MLP cannot share our weights), and the
    # mixed-length epoch's summed loss must not depend on the batching.
    ref_name = "ours" if a.prefix_projection else "peft"
    ref = next((r for r in results if r["name"] == ref_name), results[0])
    bad = []
    for r in results:
        if r["name"] == "peft" and ref_name != "peft":
            continue
        if abs(r["first_loss"] - ref["first_loss"]) > loss_tolerance(r["name"], args) * max(1.0, abs(ref["first_loss"])):
            bad.append(r["name"])
    if mixed and abs(mixed[0]["first_loss"] - mixed[1]["first_loss"]) > 1e-4 * max(1.0, abs(mixed[0]["first_loss"])):
        bad.append("ours-mixed-grouped")
    if bad:
        print(f"step-1 loss differs from {ref_name}'s for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
