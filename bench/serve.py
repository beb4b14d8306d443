"""Serving benchmark: N concurrent streaming clients over the HTTP API, mixed prefixes, against one at a time.

    python bench/serve.py                                               # tiny random llama, CPU
    python bench/serve.py --model .cache/smollm2-135m-instruct --new_tokens 32 --out bench/results/serve.md

The server (``python -c 'ptuning.server.run_serve(...)'``) runs in its own process with three random prefixes
(``--pre_seq_len`` each) on the base. Every row sends the same ``--requests`` chat requests (model cycling over the
base and the prefixes, ``ignore_eos`` so each yields exactly ``--new_tokens`` tokens), split over N client threads;
the 1-client row is the one-at-a-time reference. Reported: aggregate generated tokens/s and its ratio to one at a
time, time to first token, and per-token latency (a request's streaming time after its first token divided by its
later tokens; p50/p95 over requests). A static-batching server (a new batch only
when the running one is done) serves the widest row again for comparison, and one client measures the per-token cost
of a prefix against the bare base.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tables import markdown_table, ratio, versions  # noqa: E402


def make_files(model: str, pre_seq_len: int, workdir: str) -> tuple[str, dict[str, str]]:
    """(base dir, {name: prefix dir}): the tiny model when ``model`` is 'tiny', random prefixes on it."""
    import torch

    from ptuning.export import save_prefix
    from ptuning.model import attach_prefix, load_base_model

    if model == "tiny":
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from tiny_models import save_tiny_checkpoint

        model = save_tiny_checkpoint(os.path.join(workdir, "tiny"))
    base, _ = load_base_model(model, torch_dtype="fp32")
    prefixes = {}
    for i, name in enumerate(("p1", "p2", "p3")):
        wrapped = attach_prefix(base, pre_seq_len)
        torch.manual_seed(i)
        torch.nn.init.normal_(wrapped.prefix_encoder.embedding.weight, std=0.1)
        prefixes[name] = os.path.join(workdir, name)
        save_prefix(wrapped, prefixes[name])
    return model, prefixes


class Server:
    """``run_serve`` in a child process on a free loopback port."""

    def __init__(self, model, prefixes, threads: int, batching: str = "continuous", max_batch_size: int = 16):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        argv = ["--model_name_or_path", model, "--served_model_name", "base", "--port", str(self.port),
                "--batching", batching, "--max_batch_size", str(max_batch_size), "--torch_dtype", "fp32"]
        for name, path in prefixes.items():
            argv += ["--prefix", f"{name}={path}"]
        code = (f"import torch; torch.set_num_threads({threads}); from ptuning.server import run_serve; "
                f"run_serve({argv!r})")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        import httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start (exit {self.proc.poll()})")
            time.sleep(0.2)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def one_request(url: str, model: str, prompt: str, new_tokens: int) -> dict:
    """Stream one chat reply; times of the first token and of every later one."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens = [], 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    per_token = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return {"ttft": stamps[0] - start, "per_token": per_token, "tokens": tokens}


def run_clients(url, jobs, clients, new_tokens) -> dict:
    lock, results = threading.Lock(), []

    def worker(my_jobs):
        for model, prompt in my_jobs:
            r = one_request(url, model, prompt, new_tokens)
            with lock:
                results.append(r)

    shards = [jobs[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, shards))
    wall = time.perf_counter() - t0
    gaps = sorted(r["per_token"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "wall": wall, "tps": tokens / wall, "ttft50": statistics.median(ttfts),
            "ttft95": pct(ttfts, 95), "gap50": statistics.median(gaps), "gap95": pct(gaps, 95)}


def pct(values, q):
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def ms(x):
    return f"{1000 * x:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer llama) or a model directory")
    p.add_argument("--pre_seq_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--cost_repeats", type=int, default=6, help="alternated base / prefix requests, one client")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    clients = [int(c) for c in a.clients.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        model, prefixes = make_files(a.model, a.pre_seq_len, workdir)
        names = ["base", *prefixes]
        prompts = [f"Question {i}: what should I know about topic number {i}?" for i in range(a.requests)]
        jobs = [(names[i % len(names)], prompt) for i, prompt in enumerate(prompts)]
        rows, measured = [], {}
        server = Server(model, prefixes, a.threads)
        try:
            run_clients(server.url, jobs[:2], 1, 4)  # warm-up
            for n in clients:
                measured[n] = run_clients(server.url, jobs, n, a.new_tokens)
            cost = {"base": [], "p1": []}  # alternated, so load drifting on a shared machine hits both alike
            for _ in range(a.cost_repeats):
                for m in cost:
                    cost[m].append(one_request(server.url, m, prompts[0], a.new_tokens)["per_token"])
        finally:
            server.close()
        static = Server(model, prefixes, a.threads, batching="static")
        try:
            run_clients(static.url, jobs[:2], 1, 4)
            measured_static = run_clients(static.url, jobs, max(clients), a.new_tokens)
        finally:
            static.close()
    reference = measured[min(clients)]["tps"]
    for n in clients:
        m = measured[n]
        rows.append([f"{n}", "continuous", f"{m['tokens']}", f"{m['wall']:.2f}", f"{m['tps']:.1f}",
                     ratio(m["tps"], reference), ms(m["ttft50"]), ms(m["ttft95"]), ms(m["gap50"]), ms(m["gap95"])])
    m = measured_static
    rows.append([f"{max(clients)}", "static", f"{m['tokens']}", f"{m['wall']:.2f}", f"{m['tps']:.1f}",
                 ratio(m["tps"], reference), ms(m["ttft50"]), ms(m["ttft95"]), ms(m["gap50"]), ms(m["gap95"])])
    table = markdown_table(["clients", "batching", "tokens", "wall s", "tokens/s", "vs one at a time",
                            "TTFT p50 ms", "TTFT p95 ms", "per-token p50 ms", "per-token p95 ms"], rows)
    for m in cost:
        cost[m].sort()
    prefix_cost = markdown_table(
        [f"one client, same prompt, {a.cost_repeats} requests each (alternated)", "per-token p50 ms",
         "per-token p95 ms", "p50 vs base"],
        [[m, ms(statistics.median(cost[m])), ms(pct(cost[m], 95)),
          ratio(statistics.median(cost[m]), statistics.median(cost["base"]))] for m in cost])
    command = "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"# Serving: {a.requests} streamed chat requests x {a.new_tokens} tokens, base + 3 prefixes "
            f"(pre_seq_len {a.pre_seq_len}), model {os.path.basename(os.path.normpath(a.model))}\n\n"
            f"{table}\n\n{prefix_cost}\n\n`{command}` (server: {a.threads} torch thread(s))\n\n{versions()}\n")
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
