"""Distributed P-tuning benchmark: step time and tokens/s of 1 process vs DDP vs DeepSpeed ZeRO-2 / ZeRO-3.

    python bench/distributed.py                                  # CPU: tiny Llama, 2 processes (gloo)
    python bench/distributed.py --batch 8 --seq 1024 --pre_seq_len 128 --gc
                                    # GPUs: ~1.2B GLM geometry, bf16, one process per GPU; the table goes to
                                    # bench/results/<date>-<gpu>xN-distributed-glm-1b.md with the command

Every variant is a separate launch (``torchrun`` for several processes) of a worker that trains the same randomly
initialised model (same seed) on the same synthetic batches with ``PrefixTrainer``: the global batch (``--batch``
rows of ``--seq`` tokens, the second half of each row trained) is split over the processes, so the runs do the
same work and their step-1 losses must agree (the script fails otherwise). The worker times every optimizer step
(forward + backward + all-reduce / reduce-scatter + update) after ``--warmup`` steps; ``launch`` is the wall time of
the whole launch (imports, model build, engine setup), what a short job pays once.

ZeRO variants use ``ds_configs/*.json`` as shipped. With one GPU the multi-process variants run one process (ZeRO
then only changes the bookkeeping, which is what this measures); ``--nproc`` overrides the process count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GEOMETRIES = {
    # what the CPU can run in seconds: 2 layers, small vocabulary
    "tiny-llama": dict(model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    # ~1.2B parameters with GLM-4's attention layout (2 KV heads) and ChatGLM3's vocabulary
    "glm-1b": dict(model_type="glm", vocab_size=65024, hidden_size=2048, intermediate_size=5632,
                   num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=2, head_dim=128),
}
VARIANTS = {  # name -> (processes: "one" or "many", DeepSpeed config)
    "1 process": ("one", None),
    "DDP": ("many", None),
    "ZeRO-2": ("many", "ds_configs/zero2.json"),
    "ZeRO-3": ("many", "ds_configs/zero3.json"),
    "ZeRO-3 offload": ("many", "ds_configs/zero3_offload.json"),
}
DEFAULT_VARIANTS = "1 process,DDP,ZeRO-2,ZeRO-3"


# ---------------------------------------------------------------- worker (one training launch)


def worker(a) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback, set_seed

    from ptuning.args import PtuningTrainingArguments
    from ptuning.data import Collator
    from ptuning.model import attach_prefix
    from ptuning.train import PrefixTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.batch % world:
        raise SystemExit(f"--batch {a.batch} is not divisible by {world} processes")
    cpu = a.device == "cpu"
    set_seed(0)
    fields = dict(GEOMETRIES[a.config])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.pad_token_id = 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.config.architectures = [type(base).__name__]
    model = attach_prefix(base, a.pre_seq_len)
    # Built before the arguments exist, so never inside ZeRO-3's zero.Init (which draws other random weights):
    # every variant starts from the same weights, and ZeRO-3 partitions them when the engine is built.
    args = PtuningTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-dist-"), per_device_train_batch_size=a.batch // world,
        max_steps=a.warmup + a.steps, learning_rate=1e-3, logging_steps=10**6, save_strategy="no",
        report_to="none", use_cpu=cpu, bf16=a.dtype == "bf16", fp16=a.dtype == "fp16", seed=0,
        deepspeed=a.deepspeed, disable_tqdm=True, dataloader_drop_last=True,
        activation_checkpointing=a.gc,
    )

    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(a.batch * (a.warmup + a.steps)):
        ids = torch.randint(3, config.vocab_size, (a.seq,), generator=g).tolist()
        labels = [-100] * (a.seq // 2) + ids[a.seq // 2:]
        rows.append({"input_ids": ids, "labels": labels})

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available() and not cpu:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available() and not cpu:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    class FirstLoss(PrefixTrainer):
        first_loss = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.first_loss is None:  # this rank's share: summed over ranks below
                self.first_loss = loss.detach().float().clone()
            return loss

    timer = Timer()
    trainer = FirstLoss(model=model, args=args, train_dataset=rows, callbacks=[timer],
                        data_collator=Collator(pad_token_id=0, padding_side="right"))
    trainer.train()
    first = trainer.first_loss
    if world > 1:
        torch.distributed.all_reduce(first)
        first = first / world  # the Trainer scales each rank's share by the world size
    memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and not cpu else 0
    if trainer.args.process_index == 0:
        timed = timer.times[a.warmup:]
        with open(a.result, "w") as f:
            json.dump(dict(median=statistics.median(timed), min=min(timed), first_loss=float(first),
                           tokens=a.batch * a.seq, processes=world, peak=memory), f)
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- orchestrator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, a, nproc: int) -> dict:
    kind, ds_config = VARIANTS[name]
    procs = 1 if kind == "one" else nproc
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        worker_args = ["--worker", "--result", result, "--config", a.config, "--batch", str(a.batch), "--seq",
                       str(a.seq), "--pre_seq_len", str(a.pre_seq_len), "--dtype", a.dtype, "--steps", str(a.steps),
                       "--warmup", str(a.warmup), "--device", a.device] + (["--gc"] if a.gc else [])
        if ds_config:
            worker_args += ["--deepspeed", os.path.join(ROOT, ds_config)]
        script = os.path.abspath(__file__)
        if ds_config or procs > 1:  # DeepSpeed needs a launcher's environment even for one process
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                   str(free_port()), script, *worker_args]
        else:
            cmd = [sys.executable, script, *worker_args]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
        launch_s = time.perf_counter() - start
        if proc.returncode != 0 or not os.path.exists(result):
            raise SystemExit(f"{name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        with open(result) as f:
            return dict(name=name, launch=launch_s, **json.load(f))


def table(results: list[dict], a, nproc: int) -> str:
    from tables import markdown_table, ratio

    ref = results[0]
    ref_tps = ref["tokens"] / ref["median"]
    rows = []
    for r in results:
        tps = r["tokens"] / r["median"]
        rows.append([r["name"], str(r["processes"]), f"{r['median']:.4f}", f"{r['min']:.4f}", f"{tps:.0f}",
                     ratio(r["median"], ref["median"]), ratio(tps, ref_tps), f"{r['launch']:.1f}",
                     f"{r['peak'] / 2**20:.0f}" if r["peak"] else "-", f"{r['first_loss']:.6f}"])
    return "\n".join([
        f"config={a.config} device={a.device} dtype={a.dtype} global batch={a.batch} seq={a.seq} "
        f"pre_seq_len={a.pre_seq_len} gc={a.gc} steps={a.steps} (+{a.warmup} warmup) threads/process={a.threads} "
        f"processes={nproc}",
        "",
        markdown_table(["variant", "processes", "step median (s)", "step min (s)", "tokens/s", "step time vs 1 process",
                        "tokens/s vs 1 process", "launch (s)", "peak GPU mem (MiB)", "step-1 loss"], rows),
    ])


def versions() -> str:
    import torch
    from tables import versions as library_versions

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    return f"{library_versions('deepspeed')}, {gpu}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help=f"one of {sorted(GEOMETRIES)} (default: tiny-llama on CPU, "
                                                  "glm-1b on GPU)")
    p.add_argument("--batch", type=int, default=8, help="global batch (rows), split over the processes")
    p.add_argument("--seq", type=int, default=128, help="tokens per row (the second half is trained)")
    p.add_argument("--pre_seq_len", type=int, default=16)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--nproc", type=int, default=None, help="processes of the multi-process variants (default: "
                                                           "the GPUs, 2 on CPU)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--out", default=None, help="also write the table and the command to this file (default on "
                                                "GPU: bench/results/<date>-<gpu>-distributed-<config>.md)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0

    import torch

    gpus = torch.cuda.device_count()
    a.device = a.device or ("cuda" if gpus else "cpu")
    a.config = a.config or ("glm-1b" if gpus else "tiny-llama")
    a.dtype = a.dtype or ("bf16" if gpus else "fp32")
    if a.device == "cpu" and a.dtype == "fp16":
        p.error("fp16 needs a GPU")
    nproc = a.nproc or (gpus if gpus else 2)
    if a.out is None and gpus:
        gpu = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-").lower()
        a.out = os.path.join(ROOT, "bench", "results", f"{time.strftime('%Y-%m-%d')}-{gpu}x{gpus}-distributed-"
                             f"{a.config}.md")
    names = [n.strip() for n in a.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if names[0] != "1 process":
        names.insert(0, "1 process")
    if nproc == 1 and "DDP" in names:
        names.remove("DDP")  # the same as one process
    results = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(launch(name, a, nproc))
    command = "python bench/distributed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = f"{table(results, a, nproc)}\n\n{versions()}\ncommand: {command}\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    tolerance = 1e-4 if a.dtype == "fp32" else 2e-2
    ref = results[0]["first_loss"]
    bad = [r["name"] for r in results if abs(r["first_loss"] - ref) > tolerance * max(1.0, abs(ref))]
    if bad:
        print(f"step-1 loss differs from the single process's for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        sys.exit(main())
    # a worker: DeepSpeed on a CPU-only machine needs the same setup as main.py
    from ptuning import distributed

    distributed.prepare(sys.argv[1:] + (["--use_cpu"] if "--device" in sys.argv and
                                        sys.argv[sys.argv.index("--device") + 1] == "cpu" else []))
    try:
        sys.exit(main())
    finally:
        distributed.shutdown()
