"""Prefix encoder shapes, layout and config round-trip."""

import pytest
import torch

from ptuning.errors import UserError
from ptuning.prefix import PrefixConfig, PrefixEncoder, model_geometry
from tiny_models import tiny_model


def config(**kw):
    base = dict(pre_seq_len=4, num_layers=3, num_kv_heads=2, head_dim=5, hidden_size=20)
    base.update(kw)
    return PrefixConfig(**base)


def test_embedding_shape_is_layers_times_2_times_kv_dim():
    enc = PrefixEncoder(config())
    assert enc.embedding.weight.shape == (4, 3 * 2 * 2 * 5)
    assert enc().shape == (4, 60)


def test_projection_mlp_shapes():
    enc = PrefixEncoder(config(prefix_projection=True, prefix_hidden_size=7))
    assert enc.embedding.weight.shape == (4, 20)
    assert enc.trans[0].weight.shape == (7, 20)
    assert isinstance(enc.trans[1], torch.nn.Tanh)
    assert enc.trans[2].weight.shape == (60, 7)
    assert enc().shape == (4, 60)


def test_row_2i_is_keys_and_2i_plus_1_values_of_layer_i():
    cfg = config()
    enc = PrefixEncoder(cfg)
    flat = enc().detach()
    kv = enc.key_values(batch_size=3, dtype=torch.float32)
    assert len(kv) == cfg.num_layers
    for i, (k, v) in enumerate(kv):
        assert k.shape == v.shape == (3, cfg.num_kv_heads, cfg.pre_seq_len, cfg.head_dim)
        keys = flat[:, (2 * i) * cfg.kv_dim : (2 * i + 1) * cfg.kv_dim].view(4, 2, 5).transpose(0, 1)
        values = flat[:, (2 * i + 1) * cfg.kv_dim : (2 * i + 2) * cfg.kv_dim].view(4, 2, 5).transpose(0, 1)
        assert torch.equal(k[2], keys) and torch.equal(v[0], values)


def test_key_values_cast_to_compute_dtype_while_weights_stay_fp32():
    enc = PrefixEncoder(config())
    k, v = enc.key_values(2, torch.bfloat16)[0]
    assert k.dtype == v.dtype == torch.bfloat16
    assert enc.embedding.weight.dtype == torch.float32


def test_dropout_only_in_training():
    enc = PrefixEncoder(config(prefix_dropout=0.5))
    enc.eval()
    a = enc.key_values(2, torch.float32)[0][0]
    assert torch.equal(a, enc.key_values(2, torch.float32)[0][0])
    enc.train()
    b = enc.key_values(2, torch.float32)[0][0]
    assert (b == 0).float().mean() > 0.2


@pytest.mark.parametrize("arch,expected", [
    ("llama", dict(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32)),
    ("glm4", dict(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32)),
    ("gpt2", dict(num_layers=2, num_kv_heads=4, head_dim=8, hidden_size=32)),
])
def test_geometry_is_gqa_aware(arch, expected):
    geometry = model_geometry(tiny_model(arch).config)
    assert {k: geometry[k] for k in expected} == expected


def test_config_json_round_trip_and_clear_errors(tmp_path):
    cfg = config(prefix_projection=True, base_model_name_or_path="x/y")
    cfg.to_json(tmp_path / "c.json")
    assert PrefixConfig.from_json(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text('{"pre_seq_len": 4, "typo": 1}')
    with pytest.raises(UserError, match="unknown keys"):
        PrefixConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(UserError, match="missing"):
        PrefixConfig.from_json(tmp_path / "nope.json")
