"""Regenerate tests/fixtures/chatglm: tiny random ChatGLM checkpoints in the original remote-code layout, and the
logits / token ids that the ORIGINAL implementation gives for them.

The original code is third-party and stays out of this repository. Run this script in a scratch virtualenv with an
older transformers, pointing it at a directory holding the public original files:

    python -m venv /tmp/glmref/venv
    /tmp/glmref/venv/bin/pip install torch==2.13.0 transformers==4.40.2 sentencepiece safetensors tiktoken
    /tmp/glmref/venv/bin/python scripts/make_chatglm_fixtures.py --originals /tmp/glmref/src \
        --cases chatglm3 chatglm3_rope50 chatglm3_mha glm4
    # ChatGLM2's tokenizer only initialises under transformers < 4.34: a second venv with 4.33.3 for its cases
    /tmp/glmref/venv433/bin/python scripts/make_chatglm_fixtures.py --originals /tmp/glmref/src \
        --cases chatglm2 chatglm2_32k

where ``/tmp/glmref/src/{chatglm2,chatglm3,glm4}/`` hold ``modeling_chatglm.py``, ``configuration_chatglm.py`` and
``tokenization_chatglm.py`` of THUDM/chatglm2-6b, THUDM/chatglm3-6b and THUDM/glm-4-9b-chat. The long-context
variants are the same files with their one published difference applied here (see ``PATCHES``): ChatGLM2-6B-32k
divides positions by ``rope_ratio``; ChatGLM3-6B-32k/128k multiply the rotary base by it (as GLM-4 does).

Everything written is tiny (fixture total well under 2 MB). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "chatglm")

# Text for the synthetic tokenizers: ChatGLM-style mixed Chinese/English, digits, code-ish whitespace.
CORPUS = """你好，我是人工智能助手。请问有什么可以帮您？
Hello world! This is a tiny tokenizer for tests, trained on a few lines.
问：今天天气怎么样？ 答：今天天气很好，适合出去玩。
def add(a, b):\n    return a + b
The quick brown fox jumps over the lazy dog 1234567890.
用户说：请把这句话翻译成英文。助手回答：Please translate this sentence into English.
价格是 42 元，数量 7 个，总计 294 元。
产品评价：质量很好，物流很快，五星好评！
""".strip().splitlines()

# Tokens whose text the test feeds to both tokenizers.
TEXTS = ["你好", "Hello world!", "  two leading spaces", "价格是 42 元\n数量 7 个", "tabs\tand\nnewlines\n\n",
         "emoji 😀 and rare 龘", "def f(x):\n    return x", "isopropyl sop eop"]
CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "Hi! 你好。"},
     {"role": "user", "content": "价格是 42 元？"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello world!"},
     {"role": "assistant", "content": "Hi! 你好。"}, {"role": "user", "content": "价格是 42 元？"}],
]

SP_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
SP_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

# kv_channels x heads (64) != hidden_size (32) on purpose: the head dim must come from kv_channels.
GEOMETRY = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, kv_channels=16, num_attention_heads=4,
                multi_query_attention=True, multi_query_group_num=2, seq_length=64)
COMMON = dict(add_bias_linear=False, add_qkv_bias=True, apply_query_key_layer_scaling=True,
              apply_residual_connection_post_layernorm=False, attention_dropout=0.0, attention_softmax_in_fp32=True,
              bias_dropout_fusion=True, fp32_residual_connection=False, hidden_dropout=0.0, layernorm_epsilon=1e-05,
              original_rope=True, post_layer_norm=True, rmsnorm=True, use_cache=True, tie_word_embeddings=False,
              model_type="chatglm", architectures=["ChatGLMModel"])

# name -> (original files, config overrides, shards, weight dtype, prefix kind)
# Weights are stored in bf16 (as real checkpoints are in half precision) except for chatglm3, which keeps fp32 and
# 3 shards; every reference runs in fp32.
BF16 = dict(torch_dtype="bfloat16", eos_token_id=2, pad_token_id=0)
CASES = {
    "chatglm2": ("chatglm2", BF16, 1, torch.bfloat16, "plain"),
    "chatglm2_32k": ("chatglm2_32k", dict(BF16, rope_ratio=16.0), 1, torch.bfloat16, "plain"),
    "chatglm3": ("chatglm3", dict(torch_dtype="float32", eos_token_id=2, pad_token_id=0), 3, torch.float32,
                 "projection"),
    "chatglm3_rope50": ("chatglm3_32k", dict(BF16, rope_ratio=50), 2, torch.bfloat16, "plain"),
    # the original prefix encoder assumes multi-query attention, so this case has no prefix
    "chatglm3_mha": ("chatglm3", dict(BF16, multi_query_attention=False), 1, torch.bfloat16, None),
    "glm4": ("glm4", dict(torch_dtype="bfloat16", layernorm_epsilon=1.5625e-07, rope_ratio=500,
                          seq_length=128, attn_implementation="sdpa"), 2, torch.bfloat16, None),
}

PATCHES = {
    # ChatGLM2-6B-32k: RotaryEmbedding takes rope_ratio and divides the positions by it.
    "chatglm2_32k": ("chatglm2", [
        ("def __init__(self, dim, original_impl=False, device=None, dtype=None):",
         "def __init__(self, dim, rope_ratio=1, original_impl=False, device=None, dtype=None):"),
        ("        self.original_impl = original_impl\n",
         "        self.original_impl = original_impl\n        self.rope_ratio = rope_ratio\n"),
        ("seq_idx = torch.arange(seq_len, dtype=dtype, device=device)",
         "seq_idx = torch.arange(seq_len, dtype=dtype, device=device) / self.rope_ratio"),
        ("RotaryEmbedding(rotary_dim // 2, original_impl=config.original_rope,",
         "RotaryEmbedding(rotary_dim // 2, rope_ratio=config.rope_ratio, original_impl=config.original_rope,"),
    ]),
    # ChatGLM3-6B-32k / -128k: RotaryEmbedding multiplies the base by rope_ratio.
    "chatglm3_32k": ("chatglm3", [
        ("def __init__(self, dim, original_impl=False, device=None, dtype=None):",
         "def __init__(self, dim, rope_ratio=1, original_impl=False, device=None, dtype=None):"),
        ("        self.original_impl = original_impl\n",
         "        self.original_impl = original_impl\n        self.rope_ratio = rope_ratio\n"),
        ("        theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float",
         "        base = base * self.rope_ratio\n"
         "        theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float"),
        ("RotaryEmbedding(rotary_dim // 2, original_impl=config.original_rope,",
         "RotaryEmbedding(rotary_dim // 2, rope_ratio=config.rope_ratio, original_impl=config.original_rope,"),
    ]),
}


# ---------------------------------------------------------------- tokenizers


def train_sentencepiece(path: str) -> int:
    """A BPE sentencepiece model with ChatGLM2/3's settings (byte fallback, digits split, dummy prefix)."""
    import sentencepiece as spm
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(CORPUS * 4))
    spm.SentencePieceTrainer.train(
        input=f.name, model_prefix=path[: -len(".model")], model_type="bpe", vocab_size=400, byte_fallback=True,
        split_digits=True, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    os.remove(f.name)
    os.remove(path[: -len(".model")] + ".vocab")
    return spm.SentencePieceProcessor(model_file=path).vocab_size()


def train_tiktoken(path: str, merges: int = 100) -> int:
    """A tiny byte-level BPE in tiktoken's file format (base64 token, rank), trained on CORPUS with GLM-4's regex."""
    import regex
    words = collections.Counter()
    for line in CORPUS * 4:
        for piece in regex.findall(GLM4_PATTERN, line + "\n"):
            words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    with open(path, "w", encoding="ascii") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return len(ranks)


# ---------------------------------------------------------------- checkpoints


def random_state(model, dtype, seed: int) -> dict:
    """Random weights of the original model's own parameter shapes (it builds with skip_init: memory is garbage)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("inv_freq"):
            state[name] = tensor.clone()  # real checkpoints carry it; the converter must drop it
        elif "layernorm" in name:
            state[name] = 1.0 + 0.1 * torch.randn(tensor.shape, generator=g)
        elif name.endswith("bias"):
            state[name] = 0.1 * torch.randn(tensor.shape, generator=g)
        else:
            state[name] = 0.15 * torch.randn(tensor.shape, generator=g)
        state[name] = state[name].to(dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
    return state


def save_shards(state: dict, directory: str, shards: int) -> None:
    names = list(state)
    if shards == 1:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        return
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i * per:(i + 1) * per]}
        torch.save(part, os.path.join(directory, file))
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def original_sources(originals: str, kind: str, work: str) -> None:
    """Copy the original remote-code files (patched for the long-context variants) into ``work`` only."""
    base, patches = PATCHES.get(kind, (kind, []))
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        with open(os.path.join(originals, base, name), encoding="utf-8") as f:
            text = f.read()
        if name == "modeling_chatglm.py":
            for old, new in patches:
                if old not in text:
                    raise SystemExit(f"patch for {kind} does not apply: {old!r}")
                text = text.replace(old, new, 1)
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(work, "quantization.py"), "w") as f:  # imported lazily for int4 only; a stub suffices
        f.write("def quantize(*args, **kwargs):\n    raise NotImplementedError\n")


AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
HUB_NAMES = {"chatglm2": "THUDM/chatglm2-6b", "chatglm2_32k": "THUDM/chatglm2-6b-32k", "chatglm3": "THUDM/chatglm3-6b",
             "chatglm3_32k": "THUDM/chatglm3-6b-32k", "glm4": "THUDM/glm-4-9b-chat"}  # as the real configs name them


def make_case(name: str, originals: str, spm_path: str, spm_size: int, tik_path: str, tik_size: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    kind, overrides, shards, dtype, prefix_kind = CASES[name]
    case_dir = os.path.join(OUT, name)
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    glm4 = kind == "glm4"
    n_specials = len(GLM4_SPECIALS) if glm4 else len(SP_SPECIALS) + (0 if kind.startswith("chatglm2") else 4)
    vocab = (tik_size if glm4 else spm_size) + n_specials
    hub_name = HUB_NAMES[kind]
    config = {"_name_or_path": hub_name, **COMMON, **GEOMETRY, "padded_vocab_size": -(-vocab // 64) * 64,
              "auto_map": AUTO_MAP, **overrides}
    if glm4:
        config.update(eos_token_id=[tik_size, tik_size + 7, tik_size + 9], pad_token_id=tik_size)
    with open(os.path.join(case_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if glm4:
        shutil.copy(tik_path, os.path.join(case_dir, "tokenizer.model"))
        tok_config = {"auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
                      "added_tokens_decoder": {str(tik_size + i): {"content": t, "lstrip": False, "normalized": False,
                                                                   "rstrip": False, "single_word": False,
                                                                   "special": True}
                                               for i, t in enumerate(GLM4_SPECIALS)},
                      "additional_special_tokens": GLM4_SPECIALS, "clean_up_tokenization_spaces": False,
                      "do_lower_case": False, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                      "padding_side": "left", "remove_space": False, "tokenizer_class": "ChatGLM4Tokenizer"}
    else:
        shutil.copy(spm_path, os.path.join(case_dir, "tokenizer.model"))
        tok_config = {"name_or_path": hub_name, "remove_space": False, "do_lower_case": False,
                      "tokenizer_class": "ChatGLMTokenizer",
                      "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    with open(os.path.join(case_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)

    expected = {}
    with tempfile.TemporaryDirectory() as work:
        for file in os.listdir(case_dir):
            shutil.copy(os.path.join(case_dir, file), work)
        original_sources(originals, kind, work)
        cfg = AutoConfig.from_pretrained(work, trust_remote_code=True)
        cfg.torch_dtype = torch.float32
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, torch_dtype=torch.float32)
        seed = sum(map(ord, name))
        state = random_state(model, dtype, seed)
        save_shards(state, case_dir, shards)
        for file in os.listdir(case_dir):
            shutil.copy(os.path.join(case_dir, file), work)
        # config.torch_dtype float32 too: ChatGLM2's rotary angles are computed in that dtype (fp16 in real configs)
        model = AutoModelForCausalLM.from_pretrained(work, config=cfg, trust_remote_code=True,
                                                     torch_dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(seed + 1)
        real_vocab = tik_size if glm4 else spm_size
        ids = torch.randint(3, real_vocab, (2, 8), generator=g)
        ids[:, 0] = real_vocab + (2 if glm4 else 1)  # [gMASK]
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        ids[1, :3] = config.get("pad_token_id", 0)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            full = model(input_ids=ids[:1]).logits  # unpadded, no mask: the original's causal fast path
        tensors = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "logits": logits.float(),
                   "logits_row0_nomask": full[0, -3:].float()}
        if prefix_kind:
            tensors.update(prefix_reference(work, case_dir, config, prefix_kind, ids, mask, positions, seed))
        tok = AutoTokenizer.from_pretrained(work, trust_remote_code=True)
        expected["tokens"] = token_reference(tok, kind)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"{name}.expected.safetensors"))
    with open(os.path.join(OUT, f"{name}.tokens.json"), "w", encoding="utf-8") as f:
        json.dump(expected["tokens"], f, indent=1, ensure_ascii=False)
    return expected


def prefix_reference(work, case_dir, config, prefix_kind, ids, mask, positions, seed) -> dict:
    """A ChatGLM P-tuning checkpoint (what ChatGLM's ptuning/main.py saves) and the original's prefixed logits."""
    from transformers import AutoConfig, AutoModelForCausalLM
    pre_seq_len = 4
    cfg = AutoConfig.from_pretrained(work, trust_remote_code=True)
    cfg.pre_seq_len, cfg.prefix_projection = pre_seq_len, prefix_kind == "projection"
    cfg.torch_dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(work, config=cfg, trust_remote_code=True,
                                                 torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 2)
    prefix_state = {f"transformer.prefix_encoder.{k}": 0.5 * torch.randn(v.shape, generator=g)
                    for k, v in model.transformer.prefix_encoder.state_dict().items()}
    model.load_state_dict(prefix_state, strict=False)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    ckpt = os.path.join(case_dir, "ptuning")
    os.makedirs(ckpt)
    torch.save(prefix_state, os.path.join(ckpt, "pytorch_model.bin"))
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(dict(config, pre_seq_len=pre_seq_len, prefix_projection=prefix_kind == "projection"), f, indent=2)
    return {"prefix_logits": logits.float()}


def token_reference(tok, kind: str) -> dict:
    """Ids of plain strings and chat prompts from the original tokenizer, and its decodes."""
    out = {"plain": {t: tok(t)["input_ids"] for t in TEXTS},
           "no_special": {t: tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS},
           "specials": {t: tok.convert_tokens_to_ids(t) for t in
                        (GLM4_SPECIALS if kind == "glm4" else SP_SPECIALS + ([] if kind.startswith("chatglm2")
                                                                            else SP_ROLES))},
           "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "chat": []}
    out["decode"] = {t: tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS}
    for conv in CONVERSATIONS:
        if kind.startswith("chatglm2") and conv[0]["role"] == "system":
            continue  # ChatGLM2's prompt format has no system turn
        if kind.startswith("chatglm2"):
            users = [m["content"] for m in conv if m["role"] == "user"]
            replies = [m["content"] for m in conv if m["role"] == "assistant"]
            prompt = tok.build_prompt(users[-1], list(zip(users[:-1], replies)))
            ids = tok([prompt])["input_ids"][0]
        elif kind == "glm4":
            ids = tok.get_prefix_tokens()
            for m in conv:
                ids += tok.build_single_message(m["role"], "", m["content"])
            ids += [tok.convert_tokens_to_ids("<|assistant|>")]
        else:
            ids = tok.build_chat_input(conv[-1]["content"], history=conv[:-1])["input_ids"][0].tolist()
        # each reply as the original trainers append it after the prompt: role-less content ids
        out["chat"].append({"messages": conv, "input_ids": list(ids)})
    if kind.startswith("chatglm3"):
        out["single_message"] = {t: tok.build_single_message("assistant", "", t) for t in TEXTS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--originals", required=True, help="directory with chatglm2/ chatglm3/ glm4/ original files")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    spm_path = os.path.join(OUT, "sp_tokenizer.model")
    tik_path = os.path.join(OUT, "tiktoken_tokenizer.model")
    if not os.path.exists(spm_path):  # both runs (see the module docstring) must share one tokenizer
        train_sentencepiece(spm_path)
    if not os.path.exists(tik_path):
        train_tiktoken(tik_path)
    import sentencepiece as spm
    spm_size = spm.SentencePieceProcessor(model_file=spm_path).vocab_size()
    with open(tik_path, encoding="ascii") as f:
        tik_size = sum(1 for _ in f)
    for name in args.cases:
        make_case(name, args.originals, spm_path, spm_size, tik_path, tik_size)
        print(f"wrote {name}", file=sys.stderr)


if __name__ == "__main__":
    main()
