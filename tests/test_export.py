"""Prefix-only checkpoints: file set, size, round-trip logits, and refusal of a mismatched base."""

import json
import os

import pytest
import torch

from ptuning.errors import UserError
from ptuning.export import ENCODER_WEIGHTS, PREFIX_WEIGHTS, load_prefix, save_prefix
from ptuning.model import attach_prefix
from ptuning.prefix import CONFIG_NAME
from tiny_models import batch, tiny_model


def trained_prefix(arch="llama", **kw):
    model = attach_prefix(tiny_model(arch), 6, **kw)
    torch.manual_seed(3)
    for p in model.prefix_encoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


def test_round_trip_gives_identical_logits_and_only_prefix_files(tmp_path):
    model = trained_prefix()
    save_prefix(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, PREFIX_WEIGHTS]
    layers, kv_dim = 2, 2 * 8
    expected = 6 * layers * 2 * kv_dim * 4
    size = os.path.getsize(tmp_path / PREFIX_WEIGHTS)
    assert expected <= size <= expected + 256
    reloaded = load_prefix(tiny_model("llama"), str(tmp_path))
    ids, mask, _ = batch(left_pad=2)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, reloaded(ids, mask).logits)


def test_config_records_geometry_and_base(tmp_path):
    save_prefix(trained_prefix("glm4"), str(tmp_path))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["pre_seq_len"] == 6 and cfg["num_layers"] == 2 and cfg["num_kv_heads"] == 2 and cfg["head_dim"] == 8
    assert cfg["base_architecture"] == "Glm4ForCausalLM" and cfg["vocab_size"] == 128
    assert cfg["dtype"] == "float32" and cfg["prefix_projection"] is False


def test_projection_exports_folded_prefix_and_keeps_mlp_for_resuming(tmp_path):
    model = trained_prefix(prefix_projection=True, prefix_hidden_size=16)
    save_prefix(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, ENCODER_WEIGHTS, PREFIX_WEIGHTS]
    ids, mask, _ = batch()
    inference = load_prefix(tiny_model("llama"), str(tmp_path))
    assert not inference.prefix_config.prefix_projection
    assert not any(p.requires_grad for p in inference.parameters())
    resumed = load_prefix(tiny_model("llama"), str(tmp_path), for_training=True)
    assert resumed.prefix_config.prefix_projection
    for a, b in zip(model.prefix_encoder.parameters(), resumed.prefix_encoder.parameters()):
        assert torch.equal(a, b)
    with torch.no_grad():
        reference = model(ids, mask).logits
        assert (inference(ids, mask).logits - reference).abs().max() <= 1e-6
        assert torch.equal(resumed(ids, mask).logits, reference)


def test_no_staging_leftovers_and_overwrite_in_place(tmp_path):
    save_prefix(trained_prefix(prefix_projection=True, prefix_hidden_size=16), str(tmp_path))
    save_prefix(trained_prefix(), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, PREFIX_WEIGHTS]


@pytest.mark.parametrize("overrides,field", [
    (dict(num_hidden_layers=3), "num_layers"),
    (dict(num_key_value_heads=4), "num_kv_heads"),
    (dict(head_dim=16), "head_dim"),
    (dict(vocab_size=160), "vocab_size"),
])
def test_mismatched_base_is_refused_with_the_field(tmp_path, overrides, field):
    save_prefix(trained_prefix(), str(tmp_path))
    with pytest.raises(UserError, match=f"{CONFIG_NAME}: {field} is"):
        load_prefix(tiny_model("llama", **overrides), str(tmp_path))


def test_missing_or_corrupt_files_are_reported(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        load_prefix(tiny_model("llama"), str(tmp_path / "nope"))
    save_prefix(trained_prefix(), str(tmp_path))
    (tmp_path / PREFIX_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_prefix(tiny_model("llama"), str(tmp_path))
    os.remove(tmp_path / PREFIX_WEIGHTS)
    with pytest.raises(UserError, match="missing"):
        load_prefix(tiny_model("llama"), str(tmp_path))


def test_saving_draws_no_random_numbers(tmp_path):
    """A run that saves at step k must see the same dropout masks after k as one that does not."""
    model = attach_prefix(tiny_model("llama"), 4, prefix_projection=True, prefix_hidden_size=16)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    save_prefix(model, str(tmp_path))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_an_encoder_task_prefix_is_not_loaded_onto_a_causal_lm(tmp_path):
    model = attach_prefix(tiny_model("llama"), 4)
    save_prefix(model, str(tmp_path))
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "task_type": "seq_cls"}))
    with pytest.raises(UserError, match="a seq_cls prefix for an encoder"):
        load_prefix(tiny_model("llama"), str(tmp_path))
