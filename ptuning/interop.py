"""Other prefix formats: ChatGLM-6B/2/3 P-tuning ``pytorch_model.bin`` import, PEFT prefix-tuning export/import.

All three store the same flat prefix ``[pre_seq_len, num_layers * 2 * kv_dim]`` (block ``2i`` = keys of layer ``i``,
``2i + 1`` = values), so conversion copies tensors and writes the matching config. PEFT has one width for keys and
values; a prefix whose keys and values differ in width (multi-head latent attention, DeepSeek-V2/V3) is refused:

- ChatGLM: ``transformer.prefix_encoder.embedding.weight`` (+ ``trans.0/2.*`` with ``prefix_projection``). ChatGLM
  does not shift token positions by ``pre_seq_len``, so the imported config says ``position_offset: false``.
- PEFT: ``adapter_config.json`` (``peft_type: PREFIX_TUNING``) + ``adapter_model.safetensors`` holding
  ``prompt_embeddings``. PEFT shifts positions (``position_offset: true``).

Pickled ``.bin`` files are read with ``torch.load(weights_only=True)`` only, and must hold nothing but tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import types

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .export import (PREFIX_KEY, PREFIX_WEIGHTS, _load_tensors, directory_written_atomically, read_prefix_config,
                      save_prefix)
from .prefix import CONFIG_NAME, PrefixConfig, PrefixEncoder, model_geometry

CHATGLM_PREFIX = "prefix_encoder."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_BIN_WEIGHTS = "adapter_model.bin"
PEFT_KEY = "prompt_embeddings"


# ---------------------------------------------------------------- reading


def read_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or from a pickled ``.bin`` with ``torch.load(weights_only=True)``; any
    non-tensor object inside is refused rather than unpickled."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refused: not a plain tensor checkpoint loadable with weights_only=True ({first})") \
            from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    bad = sorted(str(k) for k, v in state.items() if not torch.is_tensor(v))
    if bad:
        raise UserError(f"{path}: refused: entries that are not tensors: {', '.join(bad[:5])}")
    return state


def config_geometry(path: str) -> dict:
    """Layers, kv heads, key/value head dims, hidden size and vocab from a ``config.json`` (a directory or the file).

    A model type transformers knows is probed (``ptuning.capability``: what its attention caches); anything else is
    read as plain JSON so ChatGLM's remote-code configs need no code: ``num_layers``, ``multi_query_group_num``,
    ``kv_channels`` and ``padded_vocab_size`` are understood as well as the transformers names."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"{path}: no config.json to read the model geometry from")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{file}: expected a JSON object")
    known = _known_config(raw)
    if known is not None:
        return {**model_geometry(known), "architecture": (raw.get("architectures") or [raw.get("model_type", "")])[0]}
    raw = dict(raw.get("text_config") or raw)
    if "num_hidden_layers" not in raw and "num_layers" in raw:
        raw["num_hidden_layers"] = raw["num_layers"]
    if "head_dim" not in raw and "kv_channels" in raw:
        raw["head_dim"] = raw["kv_channels"]
    if "padded_vocab_size" in raw:
        raw["vocab_size"] = raw["padded_vocab_size"]
    if not raw.get("multi_query_attention", True):
        raw.pop("multi_query_group_num", None)
    try:
        geometry = model_geometry(types.SimpleNamespace(**raw))
    except (TypeError, ValueError, ZeroDivisionError):
        raise UserError(f"{file}: cannot tell layers / attention heads / hidden size from this config") from None
    return {**geometry, "architecture": (raw.get("architectures") or [raw.get("model_type", "")])[0] or ""}


def _known_config(raw: dict):
    """A transformers config object for a ``config.json`` whose model_type transformers knows, else None."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING or raw.get("auto_map"):
        return None
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception:  # a config transformers rejects is read field by field below
        return None


def _check_width(where: str, width: int, geometry: dict) -> None:
    kv, k, v = geometry["num_kv_heads"], geometry["head_dim"], geometry.get("value_head_dim", geometry["head_dim"])
    expected = geometry["num_layers"] * kv * (k + v)
    if width != expected:
        dims = f"2 x {kv} kv heads x {k} head dim" if k == v else f"{kv} kv heads x ({k} key + {v} value dims)"
        raise UserError(
            f"{where}: prefix width {width} does not fit the model config ({geometry['num_layers']} layers x "
            f"{dims} = {expected}); pass the config.json of the model this prefix was trained for"
        )


def _write(config: PrefixConfig, out_dir: str, prefix: torch.Tensor, encoder_state: dict | None = None) -> PrefixConfig:
    """Our checkpoint layout via ``save_prefix`` (atomic, config written last)."""
    for name in (CONFIG_NAME, PEFT_CONFIG):
        if os.path.exists(os.path.join(out_dir, name)):
            raise UserError(f"{out_dir}: already holds a checkpoint ({name}); choose an empty directory")
    encoder = PrefixEncoder(config)
    with torch.no_grad():
        if encoder_state:
            encoder.load_state_dict(encoder_state)
        else:
            encoder.embedding.weight.copy_(prefix)
    save_prefix(types.SimpleNamespace(prefix_encoder=encoder, prefix_config=config), out_dir)
    return config


# ---------------------------------------------------------------- ChatGLM


def import_chatglm(checkpoint: str, out_dir: str, model_config: str | None = None) -> PrefixConfig:
    """Convert a ChatGLM-6B / ChatGLM2 / ChatGLM3 P-tuning checkpoint into our format.

    ``checkpoint`` is the ``pytorch_model.bin`` (or ``.safetensors``) or the directory holding it; ``model_config``
    is the ``config.json`` (or its directory) giving the geometry, by default the one next to the weights (ChatGLM's
    trainer saves it there). With ``prefix_projection`` the MLP is folded into the prefix; when its input is
    ``hidden_size`` wide (ChatGLM-6B) the MLP weights are kept too, so training can resume with the projection.
    """
    path = checkpoint
    if os.path.isdir(path):
        candidates = [n for n in ("pytorch_model.bin", "model.safetensors") if os.path.isfile(os.path.join(path, n))]
        if not candidates:
            raise UserError(f"{path}: no pytorch_model.bin or model.safetensors in this directory")
        path = os.path.join(path, candidates[0])
    state = read_tensor_file(path)
    encoder = {k.split(CHATGLM_PREFIX, 1)[1]: v.float() for k, v in state.items() if CHATGLM_PREFIX in k}
    if "embedding.weight" not in encoder:
        raise UserError(f"{path}: no 'transformer.prefix_encoder.embedding.weight'; is this a P-tuning checkpoint?")
    projection = any(k.startswith("trans.") for k in encoder)
    config_source = model_config or os.path.dirname(os.path.abspath(path))
    geometry = config_geometry(config_source)
    embedding = encoder["embedding.weight"]
    if projection:
        missing = sorted({"trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"} - set(encoder))
        if missing:
            raise UserError(f"{path}: prefix projection weights missing: {', '.join(missing)}")
        with torch.no_grad():
            hidden = torch.tanh(embedding @ encoder["trans.0.weight"].T + encoder["trans.0.bias"])
            prefix = hidden @ encoder["trans.2.weight"].T + encoder["trans.2.bias"]
    else:
        prefix = embedding
    _check_width(path, prefix.shape[1], geometry)
    keep_mlp = projection and embedding.shape[1] == geometry["hidden_size"]
    config = PrefixConfig(
        pre_seq_len=prefix.shape[0],
        num_layers=geometry["num_layers"], num_kv_heads=geometry["num_kv_heads"], head_dim=geometry["head_dim"],
        value_head_dim=geometry["value_head_dim"],
        hidden_size=geometry["hidden_size"], vocab_size=geometry["vocab_size"],
        prefix_projection=keep_mlp,
        prefix_hidden_size=encoder["trans.0.weight"].shape[0] if keep_mlp else 512,
        position_offset=False,
        base_model_name_or_path=os.path.abspath(config_source) if os.path.exists(config_source) else config_source,
        base_architecture=geometry["architecture"],
    )
    mlp_state = {k: v.contiguous() for k, v in encoder.items() if k == "embedding.weight" or k.startswith("trans.")}
    return _write(config, out_dir, prefix.contiguous(), mlp_state if keep_mlp else None)


# ---------------------------------------------------------------- PEFT


def _base_reference(name_or_path: str | None) -> str | None:
    """A base model reference that works from any directory: a local path made absolute, a hub id as it is."""
    if name_or_path and os.path.isdir(os.path.expanduser(name_or_path)):
        return os.path.abspath(os.path.expanduser(name_or_path))
    return name_or_path or None


def export_peft(ckpt_dir: str, out_dir: str, base_model_name_or_path: str | None = None) -> str:
    """Write our prefix as a PEFT ``PREFIX_TUNING`` adapter that ``PeftModel.from_pretrained(base, out_dir)`` loads."""
    config = read_prefix_config(ckpt_dir)
    if not config.position_offset:
        raise UserError(f"{ckpt_dir}: position_offset is false (ChatGLM positions); PEFT always shifts positions by "
                        "pre_seq_len, so this prefix would not behave the same there")
    prefix = _load_tensors(os.path.join(ckpt_dir, PREFIX_WEIGHTS)).get(PREFIX_KEY)
    if prefix is None or tuple(prefix.shape) != (config.pre_seq_len, config.prefix_width):
        raise UserError(f"{os.path.join(ckpt_dir, PREFIX_WEIGHTS)}: no {PREFIX_KEY!r} tensor of shape "
                        f"({config.pre_seq_len}, {config.prefix_width})")
    if not config.same_widths:
        raise UserError(f"{os.path.join(ckpt_dir, CONFIG_NAME)}: keys are {config.head_dim} and values "
                        f"{config.value_head_dim} wide per head ({config.base_architecture or 'this model'}, e.g. "
                        "multi-head latent attention); PEFT's prefix tuning has one width for both and cannot hold "
                        "this prefix, so keep it in ptuning format")
    if os.path.exists(os.path.join(out_dir, PEFT_CONFIG)):
        raise UserError(f"{out_dir}: already holds {PEFT_CONFIG}; choose an empty directory")
    os.makedirs(out_dir, exist_ok=True)
    adapter = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": config.pre_seq_len,
        "num_layers": config.num_layers,
        # PEFT's own grouped-query convention: token_dim = kv heads x head dim, num_attention_heads = kv heads
        "token_dim": config.kv_dim,
        "num_attention_heads": config.num_kv_heads,
        "encoder_hidden_size": config.kv_dim,
        "prefix_projection": False,
        "inference_mode": True,
        "num_transformer_submodules": 1,
        "base_model_name_or_path": _base_reference(base_model_name_or_path or config.base_model_name_or_path),
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
        "init_weights": None,
    }
    save_file({PEFT_KEY: prefix.float().contiguous()}, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, PEFT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter, f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir


def import_peft(adapter_dir: str, out_dir: str, model_config: str | None = None) -> PrefixConfig:
    """Convert a PEFT prefix-tuning adapter directory into our format (``position_offset: true``, as PEFT runs it).

    ``model_config`` (a model directory or its config.json) supplies hidden size and vocab and checks the geometry;
    by default the adapter's ``base_model_name_or_path`` when that is a local directory.
    """
    config_path = os.path.join(adapter_dir, PEFT_CONFIG)
    if not os.path.isfile(config_path):
        raise UserError(f"{adapter_dir}: no {PEFT_CONFIG}; not a PEFT adapter directory")
    try:
        with open(config_path, encoding="utf-8") as f:
            adapter = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(adapter, dict):
        raise UserError(f"{config_path}: expected a JSON object, got {type(adapter).__name__}")
    if adapter.get("peft_type") != "PREFIX_TUNING":
        raise UserError(f"{config_path}: peft_type is {adapter.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    if (adapter.get("num_transformer_submodules") or 1) != 1:
        raise UserError(f"{config_path}: an encoder-decoder adapter (num_transformer_submodules > 1) is not supported")
    weights = os.path.join(adapter_dir, PEFT_WEIGHTS)
    if not os.path.isfile(weights):
        weights = os.path.join(adapter_dir, PEFT_BIN_WEIGHTS)
    state = read_tensor_file(weights)
    if PEFT_KEY not in state:
        raise UserError(f"{weights}: no {PEFT_KEY!r} tensor")
    prefix = state[PEFT_KEY].float()
    layers, heads, token_dim = adapter.get("num_layers"), adapter.get("num_attention_heads"), adapter.get("token_dim")
    if not (layers and heads and token_dim):
        raise UserError(f"{config_path}: num_layers, num_attention_heads and token_dim are required")
    source = model_config or adapter.get("base_model_name_or_path") or ""
    if not (model_config or os.path.isdir(source)):
        raise UserError(f"{config_path}: base model {source!r} is not a local directory; pass --model_name_or_path "
                        "(its config.json gives hidden size and vocab)")
    geometry = config_geometry(source)
    # PEFT rewrites token_dim / num_attention_heads to the kv geometry for grouped-query models; trust the model.
    if geometry["value_head_dim"] != geometry["head_dim"]:
        raise UserError(f"{config_path}: the base model's keys and values differ in width ({geometry['head_dim']} vs "
                        f"{geometry['value_head_dim']} per head); PEFT's prefix tuning cannot serve it")
    _check_width(weights, prefix.shape[1], geometry)
    if prefix.shape[1] != layers * 2 * token_dim:
        raise UserError(f"{weights}: prompt_embeddings width {prefix.shape[1]} != 2 x num_layers x token_dim")
    config = PrefixConfig(
        pre_seq_len=prefix.shape[0],
        num_layers=geometry["num_layers"], num_kv_heads=geometry["num_kv_heads"], head_dim=geometry["head_dim"],
        value_head_dim=geometry["value_head_dim"],
        hidden_size=geometry["hidden_size"], vocab_size=geometry["vocab_size"],
        position_offset=True,
        base_model_name_or_path=adapter.get("base_model_name_or_path") or os.path.abspath(source),
        base_architecture=geometry["architecture"],
    )
    return _write(config, out_dir, prefix.contiguous())


# ---------------------------------------------------------------- command line


def run_convert(argv: list[str]) -> str:
    """``python main.py convert --from chatglm|peft|ptuning --to ptuning|peft --input SRC --output_dir DST``, and
    ``--from chatglm-model``: an original ChatGLM2/3/GLM-4 model directory -> GlmForCausalLM (see ptuning.chatglm)."""
    parser = argparse.ArgumentParser(
        prog="main.py convert",
        description="Convert prefix checkpoints: ChatGLM P-tuning -> ours, PEFT prefix tuning <-> ours; "
                    "--from chatglm-model converts an original ChatGLM2/3/GLM-4 model directory to GlmForCausalLM.",
    )
    parser.add_argument("--from", dest="source", choices=["chatglm", "chatglm-model", "peft", "ptuning"],
                        default="ptuning", help="format of --input (default: ptuning, this project's); "
                                                "chatglm-model: an original remote-code ChatGLM model directory")
    parser.add_argument("--to", dest="target", choices=["ptuning", "peft"], default="ptuning",
                        help="format to write (default: ptuning)")
    parser.add_argument("--input", required=True, help="checkpoint file or directory to read")
    parser.add_argument("--output_dir", required=True, help="directory to write (must not hold a checkpoint)")
    parser.add_argument("--model_name_or_path", default=None,
                        help="model directory (or config.json) giving the geometry; ChatGLM: default is the "
                             "config.json next to the weights; PEFT import: default is the adapter's base model")
    def refuse(message: str):  # argparse would print its usage text first; one line is enough
        raise UserError(f"convert: {message} (see `python main.py convert --help`)")

    parser.error = refuse
    args = parser.parse_args(argv)
    if args.source == "chatglm-model":
        from .chatglm import convert_model
        result = convert_model(args.input, args.output_dir)
        print(f"wrote {result}: GlmForCausalLM + fast tokenizer converted from the original ChatGLM checkpoint "
              f"{args.input}")
        return result
    if args.source == args.target:
        raise UserError(f"convert: --from and --to are both {args.source!r}; nothing to do")
    converters = {("chatglm", "ptuning"): import_chatglm, ("peft", "ptuning"): import_peft,
                  ("ptuning", "peft"): export_peft}
    convert = converters.get((args.source, args.target))
    if convert is None:
        raise UserError(f"convert: {args.source} -> {args.target} is not supported (chatglm -> ptuning, "
                        "peft -> ptuning, ptuning -> peft)")
    with directory_written_atomically(args.output_dir) as staging:  # a crash leaves no half-converted directory
        config = convert(args.input, staging, args.model_name_or_path)
    if args.target == "peft":
        print(f"wrote a PEFT PREFIX_TUNING adapter to {args.output_dir}")
        return args.output_dir
    print(f"wrote {args.output_dir}: pre_seq_len={config.pre_seq_len}, position_offset={config.position_offset}, "
          f"prefix_projection={config.prefix_projection}")
    return args.output_dir
