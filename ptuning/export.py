"""Prefix-only checkpoints: safetensors weights plus a JSON config, never a base-model weight."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .model import PrefixTunedModel
from .prefix import CONFIG_NAME, PrefixConfig, model_geometry

PREFIX_WEIGHTS = "prefix_model.safetensors"
ENCODER_WEIGHTS = "prefix_encoder.safetensors"
PREFIX_KEY = "prefix"


def prefix_state(model: PrefixTunedModel, state_dict: dict | None = None) -> tuple[dict, dict]:
    """(folded prefix for inference, encoder weights for resuming); the second is empty without projection."""
    encoder = model.prefix_encoder
    if state_dict is not None:
        encoder_state = {k.split("prefix_encoder.", 1)[1]: v for k, v in state_dict.items() if "prefix_encoder." in k}
    else:
        encoder_state = encoder.state_dict()
    encoder_state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in encoder_state.items()}
    if not model.prefix_config.prefix_projection:
        return {PREFIX_KEY: encoder_state["embedding.weight"]}, {}
    # fork_rng: building the shadow draws init values; saving must not shift the dropout masks of the steps after it
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        shadow = type(encoder)(encoder.config)
        shadow.load_state_dict(encoder_state)
        folded = shadow().detach().contiguous()
    return {PREFIX_KEY: folded}, encoder_state


def save_prefix(model: PrefixTunedModel, out_dir: str, state_dict: dict | None = None) -> None:
    """Write the prefix so that a reader never sees a half-written checkpoint: files go in under temporary names
    and are renamed into place, the config last (its presence marks a complete checkpoint)."""
    folded, encoder_state = prefix_state(model, state_dict)
    config = dataclasses.replace(model.prefix_config, dtype="float32")
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".prefix-", dir=out_dir)
    try:
        save_file(folded, os.path.join(staging, PREFIX_WEIGHTS), metadata={"format": "pt"})
        names = [PREFIX_WEIGHTS]
        if encoder_state:
            save_file(encoder_state, os.path.join(staging, ENCODER_WEIGHTS), metadata={"format": "pt"})
            names.append(ENCODER_WEIGHTS)
        config.to_json(os.path.join(staging, CONFIG_NAME))
        names.append(CONFIG_NAME)
        if not encoder_state and os.path.exists(os.path.join(out_dir, ENCODER_WEIGHTS)):
            os.remove(os.path.join(out_dir, ENCODER_WEIGHTS))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# prefix_config.json fields and the values they must hold (a hand-edited config is refused before it is used)
_POSITIVE = ("pre_seq_len", "num_layers", "num_kv_heads", "head_dim", "value_head_dim", "hidden_size",
             "prefix_hidden_size", "format_version")


@contextlib.contextmanager
def directory_written_atomically(out_dir: str):
    """Yield a hidden sibling to write into; it is renamed to ``out_dir`` (new or empty) only once complete."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir}: already holds a checkpoint or other files ({sorted(os.listdir(out_dir))[0]}); "
                        "choose a new or empty directory")
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the result gets what os.makedirs would give it
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_prefix_config(ckpt_dir: str, flag: str = "ptuning_checkpoint") -> PrefixConfig:
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"--{flag} {ckpt_dir!r}: not a directory")
    path = os.path.join(ckpt_dir, CONFIG_NAME)
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x})") from None
    except (OSError, ValueError):
        raw = {}  # missing or not JSON: PrefixConfig.from_json says which
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object of prefix settings, got {type(raw).__name__}")
    config = PrefixConfig.from_json(path)
    for key in (*_POSITIVE, "vocab_size"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key in _POSITIVE else 0):
            kind = "a positive integer" if key in _POSITIVE else "an integer >= 0"
            raise UserError(f"{path}: {key}: expected {kind}, got {value!r}")
    for key in ("prefix_projection", "position_offset"):
        if not isinstance(getattr(config, key), bool):
            raise UserError(f"{path}: {key}: expected true or false, got {getattr(config, key)!r}")
    dropout = config.prefix_dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"{path}: prefix_dropout: expected a number in [0, 1), got {dropout!r}")
    return config


def check_prefix_weights(ckpt_dir: str, config: PrefixConfig) -> None:
    """The weights file is complete and holds a prefix of the configured shape, read from its header alone."""
    from safetensors import safe_open

    path = os.path.join(ckpt_dir, PREFIX_WEIGHTS)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; the checkpoint is incomplete")
    try:
        with safe_open(path, framework="pt") as f:
            if PREFIX_KEY not in f.keys():
                raise UserError(f"{path}: no tensor named {PREFIX_KEY!r}")
            shape = tuple(f.get_slice(PREFIX_KEY).get_shape())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    if shape != (config.pre_seq_len, config.prefix_width):
        raise UserError(f"{path}: prefix has shape {shape}, config says ({config.pre_seq_len}, {config.prefix_width})")


def _first_line(error: Exception) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def _load_tensors(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def check_fits_base(config: PrefixConfig, base, ckpt_dir: str) -> None:
    """Refuse a prefix trained for another model (``base``: its config, or the loaded model) before it produces
    garbage."""
    geometry = model_geometry(base)
    for key in ("num_layers", "num_kv_heads", "head_dim", "value_head_dim", "vocab_size"):
        expected, found = getattr(config, key), geometry[key]
        if key == "vocab_size" and not expected:
            continue
        if expected != found:
            raise UserError(
                f"{os.path.join(ckpt_dir, CONFIG_NAME)}: {key} is {expected} but the base model has {found}; "
                f"this prefix was trained for {config.base_model_name_or_path or 'another model'}"
            )


def load_prefix(base, ckpt_dir: str, for_training: bool = False) -> PrefixTunedModel:
    """Attach a saved prefix to ``base``; for inference the folded prefix replaces the projection MLP."""
    config = read_prefix_config(ckpt_dir)
    if config.task_type != "causal_lm":
        raise UserError(f"{os.path.join(ckpt_dir, CONFIG_NAME)}: a {config.task_type} prefix for an encoder; load it "
                        "with main.py --ptuning_checkpoint (or ptuning.nlu), not onto a causal LM")
    check_fits_base(config, base, ckpt_dir)
    folded = _load_tensors(os.path.join(ckpt_dir, PREFIX_WEIGHTS))
    if PREFIX_KEY not in folded:
        raise UserError(f"{os.path.join(ckpt_dir, PREFIX_WEIGHTS)}: no tensor named {PREFIX_KEY!r}")
    prefix = folded[PREFIX_KEY]
    if tuple(prefix.shape) != (config.pre_seq_len, config.prefix_width):
        raise UserError(
            f"{os.path.join(ckpt_dir, PREFIX_WEIGHTS)}: prefix has shape {tuple(prefix.shape)}, "
            f"config says ({config.pre_seq_len}, {config.prefix_width})"
        )
    if config.prefix_projection and for_training:
        model = PrefixTunedModel(base, config)
        encoder_state = _load_tensors(os.path.join(ckpt_dir, ENCODER_WEIGHTS))
        try:
            model.prefix_encoder.load_state_dict(encoder_state)
        except RuntimeError as e:
            raise UserError(f"{os.path.join(ckpt_dir, ENCODER_WEIGHTS)}: does not match the config ({e})") from None
        return model
    model = PrefixTunedModel(base, dataclasses.replace(config, prefix_projection=False))
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.copy_(prefix)
    if not for_training:
        model.prefix_encoder.requires_grad_(False)
    return model


def load_encoder_weights(model: PrefixTunedModel, ckpt_dir: str) -> None:
    """Restore trainable prefix weights in place (Trainer resume)."""
    config = read_prefix_config(ckpt_dir)
    if config.prefix_projection != model.prefix_config.prefix_projection or config.pre_seq_len != model.prefix_config.pre_seq_len:
        raise UserError(
            f"{os.path.join(ckpt_dir, CONFIG_NAME)}: pre_seq_len={config.pre_seq_len}, "
            f"prefix_projection={config.prefix_projection} but this run uses pre_seq_len="
            f"{model.prefix_config.pre_seq_len}, prefix_projection={model.prefix_config.prefix_projection}"
        )
    if config.prefix_projection:
        state = _load_tensors(os.path.join(ckpt_dir, ENCODER_WEIGHTS))
    else:
        state = {"embedding.weight": _load_tensors(os.path.join(ckpt_dir, PREFIX_WEIGHTS))[PREFIX_KEY]}
    model.prefix_encoder.load_state_dict(state)
