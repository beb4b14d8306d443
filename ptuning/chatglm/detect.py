"""Is a directory an original ChatGLM checkpoint, of which generation, and how does its own code use rope_ratio.

The checkpoint's ``.py`` files are read as text, never imported or run.
"""

from __future__ import annotations

import json
import logging
import os
import re

from ..errors import UserError

logger = logging.getLogger(__name__)


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
    names += " " + str((read_json(os.path.join(path, "tokenizer_config.json")) or {}).get("name_or_path", ""))
    if re.search(r"chatglm2|codegeex2", names, re.I):
        return "chatglm2"
    if not re.search(r"chatglm3", names, re.I):
        logger.warning("%s: no tokenization_chatglm.py or model name to tell ChatGLM2 from ChatGLM3; assuming ChatGLM3",
                       path)
    return "chatglm3"


def read_json(path: str):
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
