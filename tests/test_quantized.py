"""4-bit (NF4, FP4, double quant) and 8-bit bases through bitsandbytes, on CPU: the prefix stays fp32 and trainable,
its keys/values reach the attention in the compute dtype, gradient checkpointing gives the same gradients,
generate() reads the prefix, and the exported prefix is the same files as a bf16 run's and loads onto a bf16 base."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import main
from ptuning.errors import UserError
from ptuning.export import load_prefix, save_prefix
from ptuning.model import attach_prefix, load_base_model
from ptuning.prefix import CONFIG_NAME
from tiny_models import CHATML, make_tokenizer, tiny_model, train_prefix

# hidden 64 and an MLP of 128 suit bitsandbytes' 64-value quantization blocks
GEOMETRY = dict(hidden_size=64, intermediate_size=128, head_dim=16)
QUANTIZATIONS = {
    "nf4": dict(quantization_bit=4, quant_type="nf4"),
    "fp4-double": dict(quantization_bit=4, quant_type="fp4", double_quant=True),
    "int8": dict(quantization_bit=8),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama and a tiny GLM saved like any local checkpoint, with a chat tokenizer."""
    root = tmp_path_factory.mktemp("quantized")
    tokenizer = make_tokenizer(CHATML)
    paths = {}
    for arch in ("llama", "glm"):
        model = tiny_model(arch, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           initializer_range=0.2, **GEOMETRY)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        paths[arch] = str(root / arch)
    return paths


def prefixed(path, pre_seq_len=4, torch_dtype="bf16", seed=0, **quantization):
    base, tokenizer = load_base_model(path, torch_dtype=torch_dtype, **quantization)
    model = attach_prefix(base, pre_seq_len)
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.prefix_encoder.embedding.weight, std=0.5)
    return model, tokenizer


def batch(tokenizer, rows=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tokenizer), (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return ids, torch.ones_like(ids), labels


def prefix_grad(model, ids, mask, labels):
    model.zero_grad()
    model.train()
    loss = model(ids, mask, labels=labels).loss
    loss.backward()
    return loss.detach(), model.prefix_encoder.embedding.weight.grad.clone()


@pytest.mark.parametrize("arch", ["llama", "glm"])
@pytest.mark.parametrize("name", sorted(QUANTIZATIONS))
def test_quantized_base_trains_the_fp32_prefix_with_and_without_checkpointing(checkpoints, arch, name):
    import bitsandbytes as bnb

    model, tokenizer = prefixed(checkpoints[arch], **QUANTIZATIONS[name])
    kind = bnb.nn.Linear8bitLt if name == "int8" else bnb.nn.Linear4bit
    linears = [m for m in model.base.modules() if isinstance(m, kind)]
    assert len(linears) == 2 * (4 + (2 if arch == "glm" else 3))  # every attention/MLP projection of both layers
    if name != "int8":
        assert all(m.weight.quant_type == QUANTIZATIONS[name]["quant_type"] for m in linears)
        assert all(m.weight.compress_statistics == (name == "fp4-double") for m in linears)
        assert all(m.compute_dtype == torch.bfloat16 for m in linears)
    assert not any(p.requires_grad for p in model.base.parameters())
    weight = model.prefix_encoder.embedding.weight
    assert weight.requires_grad and weight.dtype == torch.float32

    seen = {}
    attention = model.base.model.layers[0].self_attn
    hook = attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(keys=kwargs["past_key_values"].layers[0].keys.dtype,
                                                 hidden=kwargs["hidden_states"].dtype), with_kwargs=True)
    ids, mask, labels = batch(tokenizer)
    loss, plain = prefix_grad(model, ids, mask, labels)
    hook.remove()
    assert seen == {"keys": torch.bfloat16, "hidden": torch.bfloat16}  # cast to the attention's compute dtype
    assert torch.isfinite(loss) and plain.abs().sum() > 0
    assert weight.grad.dtype == torch.float32

    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_gc, checkpointed = prefix_grad(model, ids, mask, labels)
    assert torch.equal(loss, loss_gc)
    assert torch.allclose(plain, checkpointed, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", sorted(QUANTIZATIONS))
def test_generate_reads_the_prefix_and_starts_where_forward_ends(checkpoints, name):
    model, tokenizer = prefixed(checkpoints["llama"], torch_dtype="fp32", **QUANTIZATIONS[name])
    model.eval()
    ids, mask, _ = batch(tokenizer, length=7)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        last = model(ids, mask).logits[:, -1]
        out = model.generate(ids, mask, output_scores=True, return_dict_in_generate=True, **kw)
        other, _ = prefixed(checkpoints["llama"], torch_dtype="fp32", seed=1, **QUANTIZATIONS[name])
        different = other.eval().generate(ids, mask, **kw)
    assert out.sequences.shape == (2, 7 + 5)
    assert (out.scores[0] - last).abs().max() <= 1e-4
    assert not torch.equal(out.sequences, different)


def tensors(path):
    with safe_open(path, "pt") as f:
        return {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("name", sorted(QUANTIZATIONS))
def test_exported_prefix_is_a_bf16_runs_format_and_loads_onto_a_bf16_base(checkpoints, name, tmp_path):
    quantized, _ = prefixed(checkpoints["glm"], **QUANTIZATIONS[name])
    plain, _ = prefixed(checkpoints["glm"])
    save_prefix(quantized, tmp_path / "q")
    save_prefix(plain, tmp_path / "bf16")
    names = sorted(os.listdir(tmp_path / "q"))
    assert names == sorted(os.listdir(tmp_path / "bf16")) == [CONFIG_NAME, "prefix_model.safetensors"]
    assert (json.loads((tmp_path / "q" / CONFIG_NAME).read_text())
            == json.loads((tmp_path / "bf16" / CONFIG_NAME).read_text()))
    assert tensors(tmp_path / "q" / "prefix_model.safetensors") == tensors(tmp_path / "bf16" / "prefix_model.safetensors")
    # same seed, same prefix: byte-identical files
    assert (tmp_path / "q" / "prefix_model.safetensors").read_bytes() == \
        (tmp_path / "bf16" / "prefix_model.safetensors").read_bytes()

    base, _ = load_base_model(checkpoints["glm"], torch_dtype="bf16")
    loaded = load_prefix(base, str(tmp_path / "q"))
    assert torch.equal(loaded.prefix_encoder.embedding.weight, quantized.prefix_encoder.embedding.weight)


def test_trained_prefix_moves_only_itself_and_loss_goes_down(checkpoints):
    model, tokenizer = prefixed(checkpoints["glm"], **QUANTIZATIONS["nf4"])
    model.gradient_checkpointing_enable()
    packed = {k: v.clone() for k, v in model.base.state_dict().items()}
    losses = train_prefix(model, *batch(tokenizer), steps=15)
    assert losses[-1] < losses[0] - 0.2
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in packed.items())


def test_main_trains_an_int4_base_with_checkpointing_and_predicts(checkpoints, tmp_path):
    rows = [{"prompt": p, "response": "OK"} for p in ("hi", "what", "a b", "xyz")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["--model_name_or_path", checkpoints["llama"], "--quantization_bit", "4", "--double_quant",
            "--torch_dtype", "bf16", "--do_train", "--train_file", str(data), "--do_predict", "--test_file", str(data),
            "--output_dir", str(out), "--report_to", "none", "--use_cpu", "--max_steps", "4",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--gradient_checkpointing",
            "--pre_seq_len", "4", "--max_new_tokens", "3", "--save_steps", "4"]
    assert main.main(argv) == 0
    assert {CONFIG_NAME, "prefix_model.safetensors", "generated_predictions.jsonl"} <= set(os.listdir(out))
    assert len((out / "generated_predictions.jsonl").read_text().splitlines()) == len(rows)


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_parameter_count_is_the_unquantized_one(checkpoints, name):
    from ptuning.train import parameter_count

    full, _ = load_base_model(checkpoints["llama"], torch_dtype="bf16")
    quantized, _ = load_base_model(checkpoints["llama"], torch_dtype="bf16", **QUANTIZATIONS[name])
    want = sum(p.numel() for p in full.parameters())
    assert sum(parameter_count(p) for p in quantized.parameters()) == want
    if name == "nf4":
        assert sum(p.numel() for p in quantized.parameters()) < want  # what the log showed before: packed bytes


def test_unknown_quantization_is_refused(checkpoints):
    with pytest.raises(UserError, match="--quantization_bit: expected 4 or 8, got 2"):
        load_base_model(checkpoints["llama"], quantization_bit=2)
