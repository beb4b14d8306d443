"""How long the capability probe takes on full-size configs (built on the meta device: no weights, no memory).

    python bench/probe.py

Prints, per config, the seconds of the first probe (builds the meta model, runs one token) and of a repeated one
(served from the per-config cache), and the prefix shape the probe found.
"""

import os
import sys
import time
import warnings

import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ptuning.capability import _probe_cached, probe  # noqa: E402

CONFIGS = {
    "Llama-3-70B": ("LlamaConfig", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)),
    "Gemma-2-27B": ("Gemma2Config", dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                                         num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                         vocab_size=256000)),
    "Qwen3-235B-A22B": ("Qwen3MoeConfig", dict(hidden_size=4096, moe_intermediate_size=1536, num_hidden_layers=94,
                                               num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                                               num_experts=128, num_experts_per_tok=8, vocab_size=151936)),
    "DeepSeek-V3 (671B)": ("DeepseekV3Config", {}),  # the class defaults are DeepSeek-V3's
}


def main():
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    print("| config | first probe (s) | cached (s) | prefix per layer and token |")
    print("|---|---|---|---|")
    for name, (cls, kwargs) in CONFIGS.items():
        config = getattr(transformers, cls)(**kwargs)
        start = time.perf_counter()
        found = probe(config)
        first = time.perf_counter() - start
        start = time.perf_counter()
        probe(config)
        again = time.perf_counter() - start
        s = found.shape
        print(f"| {name} | {first:.2f} | {again:.3f} | {len(found.layers)} layers x {s.kv_heads} heads x "
              f"(K {s.key_dim} + V {s.value_dim}) |")
    print(f"\n(cache: {_probe_cached.cache_info()})")


if __name__ == "__main__":
    main()
