"""Whole-checkpoint conversion, and the cache that makes an original directory usable as ``--model_name_or_path``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import torch

from ..errors import UserError
from .config import glm_config
from .detect import read_json, is_original_chatglm, read_config
from .tokenizer import build_tokenizer, stop_token_ids
from .weights import convert_weights

logger = logging.getLogger(__name__)

CACHE_ENV = "PTUNING_CACHE"
MARKER = "chatglm_conversion.json"  # written last into a converted directory: its source and our format version
FORMAT_VERSION = 1


def convert_model(src: str, out_dir: str) -> str:
    """Convert the original ChatGLM directory ``src`` into ``out_dir`` (written atomically); returns ``out_dir``."""
    from transformers import GenerationConfig

    from ..export import directory_written_atomically

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
    from ..interop import import_chatglm

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
        marker = read_json(os.path.join(out_dir, MARKER))
        if isinstance(marker, dict) and marker.get("fingerprint") == fingerprint(src) and \
                marker.get("format_version") == FORMAT_VERSION:
            logger.warning("%s is an original ChatGLM checkpoint; using its conversion in %s", src, out_dir)
            return out_dir
        if os.path.isdir(out_dir):  # the source changed since, or an older converter wrote it: convert again
            shutil.rmtree(out_dir)
        logger.warning("%s is an original ChatGLM checkpoint; converting it once to GlmForCausalLM in %s", src,
                       out_dir)
        return convert_model(src, out_dir)
