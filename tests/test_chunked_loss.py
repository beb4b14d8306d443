"""The chunked target-only training loss equals the full-logits loss and gives the same prefix gradients."""

import pytest
import torch
from torch.nn import functional as F

from ptuning.model import attach_prefix, chunked_target_loss, target_loss
from tiny_models import ARCHITECTURES, batch, tiny_model


def prefixed(arch="llama", **kw):
    model = attach_prefix(tiny_model(arch), 5, **kw)
    torch.manual_seed(0)
    for p in model.prefix_encoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.train()


def loss_and_grads(model, ids, mask, labels, rows, **kw):
    model.loss_chunk_rows = rows
    params = list(model.prefix_encoder.parameters())
    loss = model(ids, mask, labels=labels, **kw).loss
    return loss.item(), torch.autograd.grad(loss, params)


def full_logits_loss_and_grads(model, ids, mask, labels):
    logits = model(ids, mask).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    return loss.item(), torch.autograd.grad(loss, list(model.prefix_encoder.parameters()))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("projection", [False, True])
def test_chunked_loss_equals_full_logits_loss_and_gradients(arch, projection):
    model = prefixed(arch, prefix_projection=projection, prefix_hidden_size=16)
    ids, mask, labels = batch(batch_size=3, seq_len=11, left_pad=2)
    labels[2, -3:] = -100  # rows with different target columns: per-row selection, not a column union
    reference = full_logits_loss_and_grads(model, ids, mask, labels)
    for rows in (1, 4, None, 0):  # several chunks, auto (one chunk here), and chunking off (logits_to_keep)
        loss, grads = loss_and_grads(model, ids, mask, labels, rows)
        assert abs(loss - reference[0]) <= 1e-6, rows
        for a, b in zip(grads, reference[1]):
            assert (a - b).abs().max() <= 1e-6, rows


def test_chunked_loss_with_num_items_in_batch_and_gradient_checkpointing():
    model = prefixed("llama")
    ids, mask, labels = batch(left_pad=2)
    n = (labels[:, 1:] != -100).sum() * 2
    off = loss_and_grads(model, ids, mask, labels, 0, num_items_in_batch=n)
    model.gradient_checkpointing_enable()
    on = loss_and_grads(model, ids, mask, labels, 3, num_items_in_batch=n)
    assert abs(on[0] - off[0]) <= 1e-6
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(on[1], off[1]))


def test_chunked_loss_function_matches_cross_entropy_in_bf16():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 32, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(100, 32, generator=g).bfloat16()
    targets = torch.randint(0, 100, (13,), generator=g)
    chunked = chunked_target_loss(hidden, weight, targets, rows=4)
    (grad,) = torch.autograd.grad(chunked, hidden)
    plain = target_loss(F.linear(hidden, weight), targets)
    (plain_grad,) = torch.autograd.grad(plain, hidden)
    assert abs(chunked.item() - plain.item()) <= 1e-5
    assert grad.dtype == torch.bfloat16
    assert (grad.float() - plain_grad.float()).abs().max() <= 1e-2 * plain_grad.float().abs().max()


def test_without_grad_the_loss_comes_with_target_logits():
    model = prefixed("llama")
    ids, mask, labels = batch()
    with torch.no_grad():
        out = model(ids, mask, labels=labels)
    assert out.logits is not None and out.logits.shape[-1] == model.config.vocab_size
    assert model(ids, mask, labels=labels).logits is None  # training: the chunked path returns no logits
