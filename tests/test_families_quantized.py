"""4-bit (NF4) bases of families beyond Llama, on CPU: the fp32 prefix trains with and without gradient
checkpointing, the base does not move, and the memory planner's weights term is the quantized model's bytes exactly
(MoE experts stored as 3-D tensors stay in the compute dtype: bitsandbytes quantizes only nn.Linear)."""

import pytest
import torch

from families import family_model
from ptuning.memory import Geometry, Setup, state_bytes, weight_bytes
from ptuning.model import attach_prefix, load_base_model
from tiny_models import CHATML, make_tokenizer, train_prefix

# hidden 64 and MLPs of 128 suit bitsandbytes' 64-value quantization blocks
GEOMETRY = dict(hidden_size=64, intermediate_size=128, head_dim=16, moe_intermediate_size=64)
NAMES = ["gemma2", "phi3", "qwen3_moe", "deepseek_v3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families-4bit")
    tokenizer = make_tokenizer(CHATML)
    paths = {}
    for name in NAMES:
        extra = dict(GEOMETRY)
        if name == "deepseek_v3":  # MLA's own widths; head_dim is its rotary width there
            extra.update(head_dim=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=64,
                         q_lora_rank=64)
        model = family_model(name, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             initializer_range=0.2, **extra)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def batch(rows=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 100, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return ids, torch.ones_like(ids), labels


def grads(model, ids, mask, labels):
    model.zero_grad()
    model.train()
    model(ids, mask, labels=labels).loss.backward()
    return model.prefix_encoder.embedding.weight.grad.clone()


@pytest.mark.parametrize("name", NAMES)
def test_int4_base_trains_the_prefix(checkpoints, name):
    import bitsandbytes as bnb

    base, _ = load_base_model(checkpoints[name], torch_dtype="bf16", quantization_bit=4)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    model = attach_prefix(base, 4)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.prefix_encoder.embedding.weight, std=0.5)
    ids, mask, labels = batch()
    plain = grads(model, ids, mask, labels)
    model.gradient_checkpointing_enable()
    checkpointed = grads(model, ids, mask, labels)
    assert plain.abs().sum() > 0 and torch.allclose(plain, checkpointed, rtol=1e-3, atol=1e-6)

    packed = {k: v.clone() for k, v in model.base.state_dict().items()}
    losses = train_prefix(model, ids, mask, labels, steps=12)
    assert losses[-1] < losses[0] - 0.2
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in packed.items())


@pytest.mark.parametrize("name", NAMES)
def test_planned_weights_are_the_quantized_models_bytes(checkpoints, name):
    base, _ = load_base_model(checkpoints[name], torch_dtype="bf16", quantization_bit=4)
    linears, other = weight_bytes(Geometry.from_config(base.config), Setup(dtype="bf16", quantization_bit=4))
    assert linears + other == state_bytes(base)
