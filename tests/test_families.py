"""The family matrix: every decoder family in tests/families.py through the same five checks, multi-head latent
attention against a hand-derived reference, sliding windows, and one refusal per kind of model a prefix cannot reach.

``python scripts/families_table.py`` runs the same checks and writes the table in docs/models.md.
"""

import json

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from torch.nn import functional as F

from families import FAMILIES, REFUSED, family_config, family_model, refused_config
from tiny_models import batch  # same vocabulary (128) as the family configs
from ptuning.errors import UserError
from ptuning.export import load_prefix, save_prefix
from ptuning.model import attach_prefix, check_architecture, load_base_model

NAMES = sorted(FAMILIES)
# PEFT's prefix tuning shapes keys and values as [heads, head_dim] from the config; the latent cache of multi-head
# latent attention has other widths, so PEFT cannot run these (its forward fails, checked below).
PEFT_UNSUPPORTED = {"deepseek_v2": "multi-head latent attention", "deepseek_v3": "multi-head latent attention"}
P = 5


def prefixed(name, seed=0, **kw):
    model = attach_prefix(family_model(name), P, **kw)
    torch.manual_seed(seed)
    for p in model.prefix_encoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


# ------------------------------------------------------------------------------------------------ the five checks


def check_peft_parity(name):
    ours = prefixed(name)
    peft = get_peft_model(family_model(name), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    ids, mask, labels = batch()
    if name in PEFT_UNSUPPORTED:
        with pytest.raises(Exception):
            peft.prompt_encoder.default.embedding.weight.data.copy_(ours.prefix_encoder.embedding.weight.data)
            with torch.no_grad():
                peft(input_ids=ids, attention_mask=mask)
        return
    peft.prompt_encoder.default.embedding.weight.data.copy_(ours.prefix_encoder.embedding.weight.data)
    with torch.no_grad():
        assert (ours(ids, mask).logits - peft(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-5
        ours_loss = ours(ids, mask, labels=labels).loss
        peft_loss = peft(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(ours_loss.item() - peft_loss.item()) <= 1e-5


def check_checkpointing_gradients(name):
    model = prefixed(name)
    if not model.base.supports_gradient_checkpointing:
        with pytest.raises(UserError, match="does not support activation checkpointing"):
            model.gradient_checkpointing_enable()
        pytest.skip(f"{type(model.base).__name__} has no activation checkpointing in transformers")
    ids, mask, labels = batch(left_pad=2)

    def grads():
        model.zero_grad()
        model.train()
        model(ids, mask, labels=labels).loss.backward()
        return model.prefix_encoder.embedding.weight.grad.clone()

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert plain.abs().sum() > 0
    assert (plain - checkpointed).abs().max() <= 1e-6


def check_left_padding(name):
    model = prefixed(name)
    ids, mask, _ = batch(left_pad=3)
    with torch.no_grad():
        padded = model(ids, mask).logits[1, 3:]
        alone = model(ids[1:, 3:]).logits[0]
    assert (padded - alone).abs().max() <= 1e-5


def check_generate_first_token(name):
    model = prefixed(name)
    ids, mask, _ = batch(left_pad=3)
    with torch.no_grad():
        logits = model(ids, mask).logits[:, -1]
        out = model.generate(ids, mask, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, ids.shape[1]], logits.argmax(-1))
    assert (out.scores[0] - logits).abs().max() <= 1e-4


def check_export_reload(name, tmp_path):
    model = prefixed(name)
    save_prefix(model, str(tmp_path))
    reloaded = load_prefix(family_model(name), str(tmp_path))
    ids, mask, _ = batch(left_pad=2)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, reloaded(ids, mask).logits)


CHECKS = {
    "PEFT parity": check_peft_parity,
    "checkpointing grads": check_checkpointing_gradients,
    "left padding": check_left_padding,
    "generate": check_generate_first_token,
    "export/reload": check_export_reload,
}


@pytest.mark.parametrize("name", NAMES)
def test_peft_parity(name):
    check_peft_parity(name)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_gives_the_same_prefix_gradients(name):
    check_checkpointing_gradients(name)


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_row_equals_the_row_alone(name):
    check_left_padding(name)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generate_first_token_is_the_forward_argmax(name):
    check_generate_first_token(name)


@pytest.mark.parametrize("name", NAMES)
def test_export_and_reload_give_identical_logits(name, tmp_path):
    check_export_reload(name, tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_fast_decode_gives_generates_tokens(name):
    """predict/evaluate/chat decode through ptuning.decode: the same greedy tokens as generate(), left padding too."""
    from ptuning import decode

    model = prefixed(name)
    ids, mask, _ = batch(left_pad=2)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(decode.generate(model, ids, mask, **kwargs), model.generate(ids, mask, **kwargs))


# ------------------------------------------------------------------------------------------------ what the probe finds


@pytest.mark.parametrize("name", NAMES)
def test_memory_planner_counts_every_weight_and_the_prefix(name):
    """fp32 weights to the byte (MoE experts, shared experts, MLA projections, tied or untied heads), and the
    prefix width the planner charges is the one the probe gives the model."""
    from ptuning.memory import Geometry, Setup, state_bytes, weight_bytes

    geometry = Geometry.from_config(family_config(name))
    linears, other = weight_bytes(geometry, Setup(dtype="fp32"))
    model = family_model(name)
    assert linears + other == state_bytes(model)
    assert geometry.prefix_width == attach_prefix(model, P).prefix_config.prefix_width


def test_geometry_comes_from_what_the_attention_caches():
    """MLA caches the compressed latent (kv_lora_rank wide) and the shared rotary key (qk_rope_head_dim) in one head;
    Falcon's new decoder architecture computes 2 kv heads but caches them repeated for all 4 query heads (which its
    config's num_kv_heads would get wrong); GPT-NeoX has no grouping."""
    mla = attach_prefix(family_model("deepseek_v3"), P).prefix_config
    assert (mla.num_kv_heads, mla.head_dim, mla.value_head_dim) == (1, 16, 4)
    assert mla.prefix_width == 2 * (16 + 4)
    assert family_config("falcon").num_kv_heads == 2
    assert attach_prefix(family_model("falcon"), P).prefix_config.num_kv_heads == 4
    assert attach_prefix(family_model("gpt_neox"), P).prefix_config.num_kv_heads == 4


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_training_loss_equals_the_loss_of_the_returned_logits(name):
    """Soft-capped (Gemma 2) and scaled (Cohere, Granite) logits: the training loss still matches them."""
    model = prefixed(name)
    ids, mask, labels = batch(left_pad=2)
    model.train()
    loss = model(ids, mask, labels=labels).loss
    logits = model(ids, mask).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(loss.item() - full.item()) <= 1e-5


def test_mla_equals_prefix_keys_and_values_in_front_of_the_decompressed_ones():
    """DeepSeek-V3 attention by hand: the prefix latent goes through kv_b_proj like the tokens' latents, its rotary
    key is shared by all heads, and both are concatenated in front of the tokens' decompressed keys and values."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (apply_rotary_pos_emb,
                                                                      apply_rotary_pos_emb_interleave)

    model = prefixed("deepseek_v3")
    base = family_model("deepseek_v3")
    kv = model.prefix_encoder.key_values(1, torch.float32)

    def reference_attention(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        b, s, _ = hidden_states.shape
        h, dn, dr, dv = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states))).view(b, s, h, dn + dr).transpose(1, 2)
        latent, k_rot = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, dr], dim=-1)
        latent = self.kv_a_layernorm(latent)
        cos, sin = position_embeddings
        rotate = apply_rotary_pos_emb_interleave if self.config.rope_interleave else apply_rotary_pos_emb
        q_rot, k_rot = rotate(q[..., dn:], k_rot.view(b, 1, s, dr), cos, sin)
        prefix_latent, prefix_rot = kv[self.layer_idx]              # [1, 1, P, kv_lora_rank], [1, 1, P, dr]
        latent = torch.cat([prefix_latent[:, 0], latent], dim=1)    # [b, P + s, kv_lora_rank]
        k_rot = torch.cat([prefix_rot, k_rot], dim=2)               # [b, 1, P + s, dr]
        decompressed = self.kv_b_proj(latent).view(b, P + s, h, dn + dv).transpose(1, 2)
        keys = torch.cat([decompressed[..., :dn], k_rot.expand(b, h, P + s, dr)], dim=-1)
        values = decompressed[..., dn:]
        queries = torch.cat([q[..., :dn], q_rot], dim=-1)
        scores = queries @ keys.transpose(-1, -2) * self.scaling  # [b, h, s, P + s]
        causal = torch.ones(s, P + s, dtype=torch.bool).tril(P)
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = (weights @ values).transpose(1, 2).reshape(b, s, h * dv)
        return self.o_proj(out), None

    for layer in base.model.layers:
        layer.self_attn.forward = reference_attention.__get__(layer.self_attn)
    ids = batch(batch_size=1)[0]
    with torch.no_grad():
        ours = model(ids).logits
        reference = base(input_ids=ids, position_ids=torch.arange(P, P + ids.shape[1])[None]).logits
    assert (ours - reference).abs().max() <= 1e-5
    assert (ours - base.__class__(base.config).eval()(input_ids=ids).logits).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ sliding windows


def test_sliding_window_masks_the_prefix_like_any_earlier_token():
    """Mistral with a 16-token window on both layers: the prefix sits just before the first token, so a token 2 x 16
    positions later (past both layers' windows) no longer sees it, exactly as it no longer sees old tokens. PEFT
    behaves the same (checked on Gemma 2 below); the logits there equal the bare model's at the same positions."""
    model = prefixed("mistral")
    ids = batch(batch_size=1, seq_len=48)[0]
    with torch.no_grad():
        ours = model(ids).logits[0]
        bare = model.base(input_ids=ids, position_ids=torch.arange(P, P + 48)[None]).logits[0]
    assert (ours[:8] - bare[:8]).abs().max() > 1e-3            # inside the window the prefix acts
    assert (ours[32:] - bare[32:]).abs().max() <= 1e-5         # beyond two windows it cannot


def test_sliding_window_longer_than_the_window_matches_peft_and_generate():
    name = "gemma2"
    ours = prefixed(name)
    peft = get_peft_model(family_model(name), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    peft.prompt_encoder.default.embedding.weight.data.copy_(ours.prefix_encoder.embedding.weight.data)
    ids = batch(batch_size=1, seq_len=40)[0]
    with torch.no_grad():
        assert (ours(ids).logits - peft(input_ids=ids).logits).abs().max() <= 1e-5
        # generating across the window edge: the growing cache drops the prefix from the sliding layers at the same
        # step as the mask does, so each greedy token is the forward's argmax over the sequence so far
        out = ours.generate(ids[:, :10], max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
        teacher = ours(out).logits[0, 9:-1].argmax(-1)
    assert torch.equal(out[0, 10:], teacher)


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_with_one_line(kind):
    config = refused_config(kind)
    with pytest.raises(UserError, match=REFUSED[kind][2]) as info:
        check_architecture(config)
    message = str(info.value)
    assert "\n" not in message and repr(config.model_type) in message


def test_refused_before_any_weight_is_read(tmp_path):
    """A model directory with a config and no weights at all: the refusal comes from the config."""
    refused_config("linear attention (Qwen3-Next)").save_pretrained(tmp_path)
    with pytest.raises(UserError, match="qwen3_next.*linear_attention"):
        load_base_model(str(tmp_path))
    # and a supported family gets past the check to the (missing) tokenizer/weights
    config = family_config("phi3")
    assert json.loads(config.to_json_string())["model_type"] == "phi3"
    assert check_architecture(config) == "Phi3ForCausalLM"


# ------------------------------------------------------------------------------------------------ PEFT files


@pytest.mark.parametrize("name", ["gemma2", "phi3", "qwen3_moe"])
def test_peft_export_loads_in_peft_with_identical_logits(name, tmp_path):
    from peft import PeftModel

    from ptuning.interop import export_peft

    model = prefixed(name)
    save_prefix(model, str(tmp_path / "ours"))
    export_peft(str(tmp_path / "ours"), str(tmp_path / "peft"))
    peft = PeftModel.from_pretrained(family_model(name), str(tmp_path / "peft"))
    ids, mask, _ = batch()
    with torch.no_grad():
        assert (model(ids, mask).logits - peft(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-5


def test_peft_export_of_an_mla_prefix_is_refused_in_one_line(tmp_path):
    from ptuning.interop import export_peft

    save_prefix(prefixed("deepseek_v3"), str(tmp_path / "ours"))
    with pytest.raises(UserError, match="keys are 16 and values 4 wide.*PEFT's prefix tuning has one width"):
        export_peft(str(tmp_path / "ours"), str(tmp_path / "peft"))


def test_version_1_checkpoints_still_load(tmp_path):
    """A format-1 prefix_config.json (no value_head_dim) loads with values as wide as keys."""
    model = prefixed("llama")
    save_prefix(model, str(tmp_path))
    path = tmp_path / "prefix_config.json"
    raw = json.loads(path.read_text())
    assert raw["format_version"] == 2 and raw["value_head_dim"] == raw["head_dim"]
    del raw["value_head_dim"]
    raw["format_version"] = 1
    path.write_text(json.dumps(raw))
    reloaded = load_prefix(family_model("llama"), str(tmp_path))
    assert reloaded.prefix_config.value_head_dim == 8
    ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, reloaded(ids, mask).logits)


def test_multimodal_gemma3_checkpoint_trains_and_generates_on_text():
    """Gemma 3 4B+ checkpoints load as Gemma3ForConditionalGeneration: on text-only rows its language model takes the
    prefix like Gemma3ForCausalLM (same cache shapes), trains, and generates from the forward's argmax."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = dict(family_config("gemma3_text").to_dict())
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision,
                                                         mm_tokens_per_image=4)).eval()
    assert type(base).__name__ == "Gemma3ForConditionalGeneration"
    model = attach_prefix(base, P)
    assert model.prefix_config.prefix_width == attach_prefix(family_model("gemma3_text"), P).prefix_config.prefix_width
    ids, mask, labels = batch(left_pad=2)
    model.train()
    model(ids, mask, labels=labels).loss.backward()
    assert model.prefix_encoder.embedding.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        logits = model(ids, mask).logits[:, -1]
        out = model.generate(ids, mask, max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out[:, ids.shape[1]], logits.argmax(-1))


def test_peft_import_onto_an_mla_model_is_refused_in_one_line(tmp_path):
    from ptuning.interop import export_peft, import_peft

    save_prefix(prefixed("llama"), str(tmp_path / "ours"))
    export_peft(str(tmp_path / "ours"), str(tmp_path / "peft"))
    family_config("deepseek_v3").save_pretrained(tmp_path / "mla")
    with pytest.raises(UserError, match="keys and values differ in width.*PEFT's prefix tuning cannot serve it"):
        import_peft(str(tmp_path / "peft"), str(tmp_path / "back"), str(tmp_path / "mla"))


@pytest.mark.parametrize("name", ["gemma2", "deepseek_v3"])
def test_multi_prefix_serving_gives_each_row_its_own_prefix(name):
    """MultiPrefixModel on a sliding-window family and on MLA (keys and values of different widths)."""
    from ptuning.serving import MultiPrefixModel

    a, b = prefixed(name, seed=0), prefixed(name, seed=1)
    served = MultiPrefixModel(family_model(name), {"a": a, "b": b})
    ids, mask, _ = batch(left_pad=2)
    with torch.no_grad():
        both = served(ids, mask, prefix_ids=["a", "b"]).logits
        assert (both[0] - a(ids[:1], mask[:1]).logits[0]).abs().max() <= 1e-5
        assert (both[1] - b(ids[1:], mask[1:]).logits[0]).abs().max() <= 1e-5


def test_plan_command_on_an_mla_moe_config(tmp_path, capsys):
    """`main.py plan` from a config alone: the prefix the planner charges is the probed latent one, and the MoE
    experts bitsandbytes cannot quantize are named in the weights term."""
    from ptuning.memory import run_plan

    family_config("deepseek_v3").save_pretrained(tmp_path)
    result = run_plan(["--model_name_or_path", str(tmp_path), "--quantization_bit", "4", "--torch_dtype", "bf16",
                       "--pre_seq_len", "8", "--max_source_length", "16", "--max_target_length", "16"])
    assert result.terms["prefix state"] == 12 * 8 * 2 * (16 + 4)  # fp32 weights + AdamW moments, latent widths
    assert "weights: embeddings, LM head, norms, experts" in result.terms
    assert "heads × 16 (values 4)" in capsys.readouterr().out


@pytest.mark.parametrize("page", ["docs/models.md", "README.md"])
def test_docs_table_lists_every_family_of_the_matrix_and_no_failure(page):
    """The tables come from scripts/families_table.py; regenerate them (--write PAGE) when a family is added."""
    import os

    text = open(os.path.join(os.path.dirname(__file__), "..", page), encoding="utf-8").read()
    text = text.split("<!-- families table: begin")[1].split("<!-- families table: end -->")[0]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line.split("|")[2]]
    assert sorted(line.split("|")[1].split(" (")[0].strip() for line in rows) == sorted(FAMILIES)
    assert "FAIL" not in text
