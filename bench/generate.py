"""Generation benchmark: greedy tokens/s with a prefix against the bare base model, batch 1 and 8.

    python bench/generate.py                               # micro GLM geometry on CPU
    python bench/generate.py --config chatglm3-6b --dtype bf16 --pre_seq_len 128 --new_tokens 128   # on a GPU

Both runs use the same weights and prompts and generate exactly ``--new_tokens`` tokens (no early stop), so the
ratio is the prefix's cost: ``pre_seq_len`` extra keys/values per layer for every generated token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import GEOMETRIES, build_config, versions  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny-glm", help=f"one of {sorted(GEOMETRIES)} or a config dir")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--pre_seq_len", type=int, default=16)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from ptuning.model import attach_prefix

    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    config = build_config(a.config)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    base.config.architectures = [type(base).__name__]
    model = attach_prefix(base, a.pre_seq_len).eval()
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)

    lines = [f"config={a.config} device={device.type} dtype={a.dtype} prompt={a.prompt_len} new={a.new_tokens} "
             f"pre_seq_len={a.pre_seq_len} threads={a.threads}", "",
             "| batch | base tokens/s | prefix tokens/s | prefix speed vs base |", "|---|---|---|---|"]
    for b in [int(x) for x in a.batches.split(",")]:
        ids = torch.randint(3, config.vocab_size, (b, a.prompt_len), generator=torch.Generator().manual_seed(b))
        ids = ids.to(device)
        with torch.no_grad():
            t_base = timed(lambda: base.generate(ids, attention_mask=torch.ones_like(ids), **kw), a.repeats)
            t_prefix = timed(lambda: model.generate(ids, torch.ones_like(ids), **kw), a.repeats)
        tokens = b * a.new_tokens
        lines.append(f"| {b} | {tokens / t_base:.1f} | {tokens / t_prefix:.1f} | {t_base / t_prefix:.2f}x |")
    text = "\n".join(lines) + f"\n\n{versions()}\ncommand: python bench/generate.py {' '.join(argv or sys.argv[1:])}\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
