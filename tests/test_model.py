"""Patching a causal LM with a prefix: parity with PEFT, gradient checkpointing, padding, generate()."""

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from torch.nn import functional as F
from transformers import T5Config

from ptuning.errors import UserError
from ptuning.model import attach_prefix, check_architecture
from tiny_models import ARCHITECTURES, batch, tiny_model, train_prefix

ALL = sorted(ARCHITECTURES)


def prefixed(arch="llama", pre_seq_len=5, seed=0, **kw):
    model = attach_prefix(tiny_model(arch), pre_seq_len, **kw)
    torch.manual_seed(seed)
    for p in model.prefix_encoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_and_loss_equal_peft_prefix_tuning(arch):
    ours = prefixed(arch)
    peft = get_peft_model(tiny_model(arch), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    peft.prompt_encoder.default.embedding.weight.data.copy_(ours.prefix_encoder.embedding.weight.data)
    ids, mask, labels = batch()
    with torch.no_grad():
        assert (ours(ids, mask).logits - peft(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-5
        ours_loss = ours(ids, mask, labels=labels).loss
        peft_loss = peft(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(ours_loss.item() - peft_loss.item()) <= 1e-5


def prefix_grads(model, ids, mask, labels):
    model.zero_grad()
    model.train()
    model(ids, mask, labels=labels).loss.backward()
    return [p.grad.clone() for p in model.prefix_encoder.parameters()]


@pytest.mark.parametrize("arch", ALL)
@pytest.mark.parametrize("projection", [False, True])
def test_gradient_checkpointing_gives_the_same_prefix_gradients(arch, projection):
    model = prefixed(arch, prefix_projection=projection, prefix_hidden_size=16)
    ids, mask, labels = batch(left_pad=2)
    plain = prefix_grads(model, ids, mask, labels)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = prefix_grads(model, ids, mask, labels)
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        assert (a - b).abs().max() <= 1e-6


def test_target_only_loss_equals_full_logits_loss_and_gradients():
    model = prefixed("llama")
    ids, mask, labels = batch(left_pad=2)
    model.train()
    loss = model(ids, mask, labels=labels).loss
    ours = torch.autograd.grad(loss, model.prefix_encoder.embedding.weight)[0]
    logits = model(ids, mask).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    reference = torch.autograd.grad(full, model.prefix_encoder.embedding.weight)[0]
    assert abs(loss.item() - full.item()) <= 1e-6
    assert (ours - reference).abs().max() <= 1e-6


def test_loss_normalised_by_num_items_in_batch():
    model = prefixed("llama")
    ids, mask, labels = batch()
    n = (labels[:, 1:] != -100).sum()
    with torch.no_grad():
        mean = model(ids, mask, labels=labels).loss
        summed = model(ids, mask, labels=labels, num_items_in_batch=n * 2).loss
    assert torch.allclose(summed * 2, mean, atol=1e-6)


@pytest.mark.parametrize("arch", ALL)
def test_left_padding_does_not_change_a_row(arch):
    model = prefixed(arch)
    ids, mask, _ = batch(left_pad=3)
    with torch.no_grad():
        padded = model(ids, mask).logits[1, 3:]
        alone = model(ids[1:, 3:]).logits[0]
    assert (padded - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ALL)
def test_generate_first_step_equals_forward_and_batched_equals_row_by_row(arch):
    model = prefixed(arch)
    ids, mask, _ = batch(left_pad=3)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        logits = model(ids, mask).logits[:, -1]
        out = model.generate(ids, mask, output_scores=True, return_dict_in_generate=True, **kw)
        assert (out.scores[0] - logits).abs().max() <= 1e-5
        rows = [model.generate(ids[i:i + 1, pad:], **kw)[0, -6:] for i, pad in ((0, 0), (1, 3))]
    assert torch.equal(out.sequences[:, -6:], torch.stack(rows))


def test_generate_follows_the_prefix():
    """A different prefix gives different greedy text, so generate() really reads it (PEFT's did not)."""
    ids, mask, _ = batch()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = prefixed(seed=0).generate(ids, mask, **kw)
        b = prefixed(seed=1).generate(ids, mask, **kw)
    assert not torch.equal(a, b)


def test_beams_and_return_sequences_repeat_the_prefix_per_row():
    model = prefixed("llama")
    ids, mask, _ = batch(left_pad=2)
    with torch.no_grad():
        out = model.generate(ids, mask, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        greedy_beams = model.generate(ids, mask, max_new_tokens=4, num_beams=1, do_sample=False, pad_token_id=0,
                                      eos_token_id=None)
    assert out.shape == (4, ids.shape[1] + 4)
    assert greedy_beams.shape == (2, ids.shape[1] + 4)


def test_chatglm_positions_option_changes_positions_consistently():
    model = prefixed("llama", position_offset=False)
    ids, mask, _ = batch(left_pad=3)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        logits = model(ids, mask).logits[:, -1]
        out = model.generate(ids, mask, output_scores=True, return_dict_in_generate=True, **kw)
        shifted = prefixed("llama", position_offset=True)(ids, mask).logits[:, -1]
    assert (out.scores[0] - logits).abs().max() <= 1e-5
    assert (shifted - logits).abs().max() > 1e-4


def test_training_changes_only_the_prefix_and_loss_goes_down():
    model = prefixed("llama", prefix_projection=True, prefix_hidden_size=16)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    prefix_before = [p.clone() for p in model.prefix_encoder.parameters()]
    assert all(not p.requires_grad for p in model.base.parameters())
    losses = train_prefix(model, *batch(left_pad=2), steps=30)
    assert losses[-1] < losses[0] - 0.2
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in base_before.items())
    assert all(not torch.equal(a, b) for a, b in zip(prefix_before, model.prefix_encoder.parameters()))


def test_unsupported_architecture_is_named():
    config = T5Config(num_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8)
    with pytest.raises(UserError, match="'t5' is not supported: it is an encoder-decoder model"):
        check_architecture(config)


def test_non_positive_pre_seq_len_is_refused():
    with pytest.raises(UserError, match="pre_seq_len"):
        attach_prefix(tiny_model("llama"), 0)


def test_prefix_disabled_generates_with_the_bare_base():
    model = prefixed("llama")
    ids, mask, _ = batch(left_pad=2)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        with model.prefix_disabled():
            bare = model.generate(ids, mask, **kw)
        reference = model.base.generate(input_ids=ids, attention_mask=mask, **kw)
        prefixed_out = model.generate(ids, mask, **kw)
    assert torch.equal(bare, reference)
    assert not torch.equal(prefixed_out, reference)
