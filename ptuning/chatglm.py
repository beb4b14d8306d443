"""Original ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B-chat checkpoints -> transformers' native ``GlmForCausalLM``.

The remote-code layout (``modeling_chatglm.py``, ``tokenization_chatglm.py``, ``pytorch_model-*.bin``) does not load
on transformers 5, but ``GlmForCausalLM`` computes the same function, so the checkpoint is converted once, offline:

- weights, one shard at a time (``torch.load(weights_only=True)`` or safetensors; no remote code is run), into
  sharded safetensors: the fused ``query_key_value`` splits ``[heads*hd | groups*hd | groups*hd]`` into q/k/v (per head
  ``[q|k|v]`` without multi-query attention), ``dense_h_to_4h`` is already ``gate_up_proj`` (``silu(first half) *
  second half``), ``rotary_pos_emb.inv_freq`` is dropped, a ``prefix_encoder`` goes through the P-tuning importer;
- the config: RMSNorm eps, ``multi_query_group_num`` kv heads, qkv bias, rotary on the first half of each head in
  interleaved pairs (``partial_rotary_factor`` 0.5), and ``rope_ratio`` the way the checkpoint's own
  ``modeling_chatglm.py`` uses it (read as text): ChatGLM3-32k/128k and GLM-4 multiply the base (theta = 10000 *
  rope_ratio), ChatGLM2-6B-32k divides the positions (linear scaling);
- the tokenizer: a fast tokenizer from ``tokenizer.model`` (sentencepiece for ChatGLM2/3, tiktoken ranks for GLM-4)
  with ChatGLM's special tokens at their original ids, the ``[gMASK]sop`` / ``[gMASK]<sop>`` prefix, left padding and
  a chat template that reproduces the original ``build_chat_input`` ids.

``resolve_model_path`` makes this transparent: an original ChatGLM directory given as ``--model_name_or_path`` is
converted once into a cache directory (``$PTUNING_CACHE`` or ``~/.cache/ptuning/chatglm``) and reused afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re

import torch
from safetensors.torch import save_file

from .errors import UserError


logger = logging.getLogger(__name__)

SP_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
SP_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatGLM2's build_prompt: rounds counted from 1, the reply follows "答：" directly.
CHATGLM2_TEMPLATE = (
    "[gMASK]sop{% set ns = namespace(round=1, text='') %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}[Round {{ ns.round }}]\n\n问：{{ m['content'] }}\n\n答："
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% set ns.round = ns.round + 1 %}{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}")
# ChatGLM3's build_single_message encodes "\n" and the content separately, each with sentencepiece's dummy prefix;
# the space after "\n" becomes exactly that second "▁" under Metaspace(prepend_scheme="always").
CHATGLM3_TEMPLATE = (
    "[gMASK]sop{% for m in messages %}<|{{ m['role'] }}|>\n {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CACHE_ENV = "PTUNING_CACHE"
MARKER = "chatglm_conversion.json"  # written last into a converted directory: its source and our format version
FORMAT_VERSION = 1


# ---------------------------------------------------------------- detection


def read_config(path: str) -> dict | None:
    """The raw ``config.json`` of a directory, or None when there is none / it is not JSON."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def is_original_chatglm(path: str) -> bool:
    """A local directory holding a remote-code ChatGLM checkpoint (``model_type: chatglm``), of any generation."""
    raw = read_config(path) if os.path.isdir(path) else None
    return bool(raw) and raw.get("model_type") == "chatglm"


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _is_tiktoken_file(path: str) -> bool:
    with open(path, "rb") as f:
        first = f.readline()
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\s*", first) is not None


def generation(path: str, raw: dict) -> str:
    """``chatglm2``, ``chatglm3`` or ``glm4``; refuses the first generation, quantized and vision checkpoints."""
    config_file = os.path.join(path, "config.json")
    if "num_layers" not in raw or "position_encoding_2d" in raw or "inner_hidden_size" in raw:
        raise UserError(f"{config_file}: ChatGLM-6B (first generation) is a different architecture (2D rotary "
                        "positions, bidirectional attention over the prompt, GELU MLP, LayerNorm) that "
                        "GlmForCausalLM cannot express; ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat are supported")
    if raw.get("quantization_bit"):
        raise UserError(f"{config_file}: quantization_bit={raw['quantization_bit']}: a quantized original "
                        "(chatglm*-int4/int8, cpm_kernels) cannot be converted exactly; convert the full-precision "
                        "checkpoint and use --quantization_bit instead")
    if raw.get("vision_config"):
        raise UserError(f"{config_file}: a vision checkpoint (GLM-4V) is not a causal LM GlmForCausalLM can express")
    tokenizer_model = os.path.join(path, "tokenizer.model")
    if os.path.isfile(tokenizer_model) and _is_tiktoken_file(tokenizer_model):
        return "glm4"
    if not os.path.isfile(tokenizer_model) and raw.get("padded_vocab_size", 0) >= 150000:
        return "glm4"
    code = _read_text(os.path.join(path, "tokenization_chatglm.py"))
    if code:
        return "chatglm3" if "<|user|>" in code else "chatglm2"
    names = " ".join(str(raw.get(k, "")) for k in ("_name_or_path", "name_or_path"))
    names += " " + str((_read_json(os.path.join(path, "tokenizer_config.json")) or {}).get("name_or_path", ""))
    if re.search(r"chatglm2|codegeex2", names, re.I):
        return "chatglm2"
    if not re.search(r"chatglm3", names, re.I):
        logger.warning("%s: no tokenization_chatglm.py or model name to tell ChatGLM2 from ChatGLM3; assuming ChatGLM3",
                       path)
    return "chatglm3"


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def rope_scaling(path: str, raw: dict, gen: str) -> str:
    """How this checkpoint's own code uses ``rope_ratio``: ``base`` (theta * ratio), ``linear`` (positions / ratio)
    or ``none``. The modeling file is read as text, never run."""
    ratio = float(raw.get("rope_ratio", 1) or 1)
    if ratio == 1:
        return "none"
    code = _read_text(os.path.join(path, "modeling_chatglm.py"))
    if code:
        if re.search(r"/\s*self\.rope_ratio", code):
            return "linear"
        if re.search(r"base\s*\*\s*self\.rope_ratio", code):
            return "base"
        logger.warning("%s: config.json sets rope_ratio=%s but modeling_chatglm.py never uses it; ignoring it "
                       "like the original does", path, raw["rope_ratio"])
        return "none"
    # Without the code: ChatGLM2's only rope_ratio model is the 32k one (positions); ChatGLM3 and GLM-4 scale the base.
    return "linear" if gen == "chatglm2" else "base"


# ---------------------------------------------------------------- config


def glm_config(path: str, raw: dict | None = None):
    """The ``GlmConfig`` computing the same function as the original config; refuses what it cannot express."""
    from transformers import GlmConfig

    raw = raw if raw is not None else read_config(path)
    config_file = os.path.join(path, "config.json")
    gen = generation(path, raw)
    refusals = [
        (not raw.get("rmsnorm", True), "rmsnorm=false (LayerNorm)"),
        (raw.get("add_bias_linear", False), "add_bias_linear=true (biased dense / MLP layers)"),
        (raw.get("apply_residual_connection_post_layernorm", False),
         "apply_residual_connection_post_layernorm=true (residual taken after the norm)"),
        (not raw.get("post_layer_norm", True), "post_layer_norm=false (no final norm)"),
    ]
    for refused, what in refusals:
        if refused:
            raise UserError(f"{config_file}: {what} cannot be expressed by GlmForCausalLM; not converted")
    heads = raw["num_attention_heads"]
    head_dim = raw.get("kv_channels") or raw["hidden_size"] // heads
    kv_heads = raw.get("multi_query_group_num", 1) if raw.get("multi_query_attention", False) else heads
    ratio = float(raw.get("rope_ratio", 1) or 1)
    scaling = rope_scaling(path, raw, gen)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if scaling == "base":
        rope["rope_theta"] = 10000.0 * ratio
    elif scaling == "linear":
        rope.update(rope_type="linear", factor=ratio)
    eos = raw.get("eos_token_id", 2)
    pad = raw.get("pad_token_id", 0)
    config = GlmConfig(
        vocab_size=raw["padded_vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["ffn_hidden_size"], num_hidden_layers=raw["num_layers"],
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act="silu",
        attention_dropout=0.0, max_position_embeddings=raw.get("seq_length", 8192),
        rms_norm_eps=raw.get("layernorm_epsilon", 1e-5), tie_word_embeddings=False,
        attention_bias=bool(raw.get("add_qkv_bias", False)), pad_token_id=pad, eos_token_id=eos,
        bos_token_id=None, rope_parameters=rope, architectures=["GlmForCausalLM"],
    )
    config.dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(raw.get("torch_dtype"), torch.float32)
    return config, gen


# ---------------------------------------------------------------- weights


LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "encoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}


def source_shards(path: str) -> list[str]:
    """The weight files of an original checkpoint, in index order (safetensors preferred over .bin)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            data = _read_json(index)
            if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
                raise UserError(f"{index}: not a weight index (no 'weight_map')")
            files = list(dict.fromkeys(data["weight_map"].values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise UserError(f"{index}: shard {missing[0]} is missing from {path}")
            return [os.path.join(path, f) for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise UserError(f"{path}: no model.safetensors / pytorch_model*.bin weights (nor an index) in this directory")


def convert_tensors(state: dict, config, where: str, multi_query: bool = True) -> tuple[dict, dict]:
    """One shard's tensors under GlmForCausalLM names, and any ``prefix_encoder.*`` tensors (ChatGLM names)."""
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out, prefix = {}, {}
    for key in list(state):
        tensor = state.pop(key)  # drop our reference as we go: the shard's memory is released tensor by tensor
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(".weight_scale") or tensor.dtype in (torch.int8, torch.uint8):
            raise UserError(f"{where}: {key} is quantized (int4/int8 original); convert the full-precision checkpoint")
        if name == "rotary_pos_emb.inv_freq":
            continue  # recomputed by GlmRotaryEmbedding
        if name.startswith("prefix_encoder."):
            prefix[name] = tensor
            continue
        if name in RENAMES:
            out[RENAMES[name]] = tensor
            continue
        match = LAYER.fullmatch(name)
        if not match:
            raise UserError(f"{where}: unexpected tensor {key!r}; not an original ChatGLM2/3/GLM-4 checkpoint")
        layer, rest = match.groups()
        target = f"model.layers.{layer}."
        if rest in LAYER_RENAMES:
            out[target + LAYER_RENAMES[rest]] = tensor
        elif rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            if not multi_query:
                # without multi-query attention the fused rows are per head: [q_h | k_h | v_h] for h in heads
                grouped = tensor.reshape(heads, 3, hd, *tensor.shape[1:])
                q, k, v = (grouped[:, i].reshape(heads * hd, *tensor.shape[1:]).contiguous() for i in range(3))
            else:
                q, k, v = tensor.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=0)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                out[f"{target}self_attn.{proj}.{kind}"] = part.contiguous()
        else:
            raise UserError(f"{where}: unexpected tensor {key!r}; not an original ChatGLM2/3/GLM-4 checkpoint")
    return out, prefix


def convert_weights(path: str, config, out_dir: str, multi_query: bool = True) -> dict:
    """Write ``model-*.safetensors`` (+ index), one source shard in memory at a time; returns prefix tensors."""
    from .interop import read_tensor_file

    shards = source_shards(path)
    expected = _expected_shapes(config)
    seen, weight_map, prefix, total = {}, {}, {}, 0
    for i, shard in enumerate(shards, 1):
        state = read_tensor_file(shard)
        converted, shard_prefix = convert_tensors(state, config, shard, multi_query)
        del state
        prefix.update(shard_prefix)
        for name, tensor in converted.items():
            if name not in expected:
                raise UserError(f"{shard}: {name} has no place in the converted model (layer index out of range?)")
            if tuple(tensor.shape) != expected[name]:
                raise UserError(f"{shard}: {name} has shape {tuple(tensor.shape)}, the config implies {expected[name]}")
            seen[name] = shard
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        if converted:
            save_file(converted, os.path.join(out_dir, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in converted})
            total += sum(t.numel() * t.element_size() for t in converted.values())
        del converted
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise UserError(f"{path}: weights missing from the checkpoint: {', '.join(missing[:3])}"
                        f"{' ...' if len(missing) > 3 else ''}")
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)
    return prefix


def _expected_shapes(config) -> dict:
    """Parameter names and shapes of GlmForCausalLM(config), built on the meta device (no memory)."""
    from transformers import GlmForCausalLM
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


# ---------------------------------------------------------------- tokenizer


def _sentencepiece_backend(model_file: str, specials: list[str]):
    """A ``tokenizers.Tokenizer`` equal to ``SentencePieceProcessor.encode`` for ChatGLM's BPE model, with
    ``specials`` appended at ids ``vocab, vocab + 1, ...`` as ChatGLM's SPTokenizer numbers them."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    proto = import_protobuf().ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # ChatGLM2/3 ship BPE models
        raise UserError(f"{model_file}: sentencepiece model type {trainer.model_type} is not BPE; not a ChatGLM "
                        "tokenizer")
    if trainer.treat_whitespace_as_suffix or not norm.escape_whitespaces:
        raise UserError(f"{model_file}: sentencepiece whitespace options this converter cannot reproduce exactly")
    vocab_scores = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
    merges = generate_merges(vocab, vocab_scores)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=trainer.unk_piece, fuse_unk=True,
                                   byte_fallback=trainer.byte_fallback))
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    # The dummy prefix goes on every piece of text between special tokens, as on each separately encoded piece in
    # the original (transformers' default Metaspace "first" drops it after a role token), and unconditionally, as
    # sentencepiece does (Metaspace skips it when the text already starts with a space).
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    # "sop"/"eop" are plain words too: only a standalone word is the special token ("isopropyl" stays text)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False, single_word=t in ("sop", "eop"))
                                for t in specials])
    control = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (2, 3)}
    return backend, len(proto.pieces), control


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """``base64-token rank`` lines, the format of GLM-4's ``tokenizer.model`` (read without tiktoken)."""
    ranks = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise UserError(f"{path}: line {n}: expected 'base64-token rank'") from None
    return ranks


def _tiktoken_backend(model_file: str, specials: list[str]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Ranks(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(read_tiktoken_ranks)

    vocab, merges = Ranks(model_file).extract_vocab_merges_from_model(model_file)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError(f"{model_file}: token ranks are not 0..{len(vocab) - 1}")
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return backend, len(vocab)


def build_tokenizer(path: str, gen: str):
    """The fast tokenizer (a ``PreTrainedTokenizerFast``) for an original ChatGLM directory."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    model_file = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(model_file):
        raise UserError(f"{path}: no tokenizer.model to build the tokenizer from")
    if gen == "glm4":
        backend, base = _tiktoken_backend(model_file, GLM4_SPECIALS)
        ids = {t: base + i for i, t in enumerate(GLM4_SPECIALS)}
        prefix = ["[gMASK]", "<sop>"]
        source_config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        template = source_config.get("chat_template") or GLM4_TEMPLATE
        kwargs = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="[gMASK]")
        eos_id = ids["<|endoftext|>"]
    else:
        specials = SP_SPECIALS + (SP_ROLES if gen == "chatglm3" else [])
        backend, base, control = _sentencepiece_backend(model_file, specials)
        ids = {t: base + i for i, t in enumerate(specials)}
        prefix = ["[gMASK]", "sop"]
        template = CHATGLM3_TEMPLATE if gen == "chatglm3" else CHATGLM2_TEMPLATE
        eos, unk = "</s>", "<unk>"
        kwargs = dict(eos_token=eos, pad_token=unk, unk_token=unk, bos_token="[gMASK]")
        eos_id = control.get(eos, 2)
    eos_piece = kwargs["eos_token"]
    # the original's build_inputs_with_special_tokens: [gMASK] sop A (+ B eos for pairs)
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(prefix) + " $A", pair=" ".join(prefix) + f" $A $B {eos_piece}",
        special_tokens=[(t, ids[t]) for t in prefix] + [(eos_piece, eos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side="left", clean_up_tokenization_spaces=False, chat_template=template,
        model_input_names=["input_ids", "attention_mask"], **kwargs)
    for token, expected in ids.items():  # the embedding rows were trained for these ids
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise UserError(f"{model_file}: special token {token} would get id {got}, the original uses {expected}")
    return tokenizer


def stop_token_ids(tokenizer, gen: str, raw: dict) -> list[int]:
    """Generation stops on eos and, for the chat generations, on the next turn's role token."""
    eos = raw.get("eos_token_id", tokenizer.eos_token_id)
    ids = list(eos) if isinstance(eos, list) else [eos]
    if gen != "chatglm2":
        ids += [tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|observation|>")]
    return list(dict.fromkeys(i for i in ids if i is not None))


# ---------------------------------------------------------------- whole checkpoint


def convert_model(src: str, out_dir: str) -> str:
    """Convert the original ChatGLM directory ``src`` into ``out_dir`` (written atomically); returns ``out_dir``."""
    from transformers import GenerationConfig

    from .export import directory_written_atomically

    if not os.path.isdir(src):
        raise UserError(f"--input {src!r}: not a directory")
    raw = read_config(src)
    if raw is None or raw.get("model_type") != "chatglm":
        raise UserError(f"{os.path.join(src, 'config.json')}: not an original ChatGLM config (model_type 'chatglm')")
    config, gen = glm_config(src, raw)
    tokenizer = build_tokenizer(src, gen)  # before the weights: a bad tokenizer fails fast
    with directory_written_atomically(out_dir) as staging:
        prefix = convert_weights(src, config, staging, bool(raw.get("multi_query_attention", False)))
        config.save_pretrained(staging)
        stops = stop_token_ids(tokenizer, gen, raw)
        GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if prefix:
            _import_embedded_prefix(prefix, src, staging)
        with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as f:
            json.dump({"source": os.path.abspath(src), "generation": gen, "format_version": FORMAT_VERSION,
                       "fingerprint": fingerprint(src)}, f, indent=2)
    logger.info("converted %s (%s) to GlmForCausalLM in %s", src, gen, out_dir)
    return out_dir


def _import_embedded_prefix(prefix: dict, src: str, out_dir: str) -> None:
    """A model saved with its P-tuning prefix inside: the prefix becomes a ptuning checkpoint under ``prefix/``."""
    from .interop import import_chatglm

    staging = os.path.join(out_dir, ".prefix.bin")
    torch.save({f"transformer.{k}": v for k, v in prefix.items()}, staging)
    try:
        import_chatglm(staging, os.path.join(out_dir, "prefix"), src)
    finally:
        os.remove(staging)
    logger.info("%s held a P-tuning prefix; imported it to %s (use --ptuning_checkpoint)", src,
                os.path.join(out_dir, "prefix"))


def fingerprint(src: str) -> str:
    """Names, sizes and mtimes of the files a conversion reads: a changed source means a new conversion."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(src)):
        file = os.path.join(src, name)
        if os.path.isfile(file):
            st = os.stat(file)
            h.update(f"{name}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ptuning", "chatglm")


def resolve_model_path(name_or_path: str) -> str:
    """``name_or_path`` itself, or for an original ChatGLM directory its converted copy (converted on first use).

    Concurrent callers (one per rank of a distributed run) wait on a file lock: one converts, the others reuse.
    """
    from filelock import FileLock

    if not is_original_chatglm(name_or_path):
        return name_or_path
    src = os.path.abspath(name_or_path)
    key = hashlib.sha256(src.encode()).hexdigest()[:12]
    out_dir = os.path.join(cache_root(), f"{os.path.basename(src.rstrip(os.sep))}-{key}")
    os.makedirs(cache_root(), exist_ok=True)
    with FileLock(out_dir + ".lock"):
        marker = _read_json(os.path.join(out_dir, MARKER))
        if isinstance(marker, dict) and marker.get("fingerprint") == fingerprint(src) and \
                marker.get("format_version") == FORMAT_VERSION:
            logger.warning("%s is an original ChatGLM checkpoint; using its conversion in %s", src, out_dir)
            return out_dir
        if os.path.isdir(out_dir):  # the source changed since, or an older converter wrote it: convert again
            import shutil
            shutil.rmtree(out_dir)
        logger.warning("%s is an original ChatGLM checkpoint; converting it once to GlmForCausalLM in %s", src,
                       out_dir)
        return convert_model(src, out_dir)

