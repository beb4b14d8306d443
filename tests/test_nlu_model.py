"""Prefix-tuned encoders: parity with PEFT, bidirectional prefix, padding, checkpointing, what training may change."""

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import DebertaV2Config

from nlu_tiny import ENCODERS, random_batch, tiny_config, tiny_encoder
from ptuning.errors import UserError
from ptuning.nlu.model import PrefixTunedEncoder, attach_prefix, check_encoder, check_length

FAMILIES = sorted(ENCODERS)


def prefixed(family="bert", task_type="seq_cls", pre_seq_len=5, seed=0, **kw):
    model = attach_prefix(tiny_encoder(family, task_type), task_type, ["a", "b", "c"], pre_seq_len, **kw)
    torch.manual_seed(seed)
    for p in model.prefix_encoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


def peft_twin(ours, family, task_type="SEQ_CLS"):
    peft = get_peft_model(tiny_encoder(family), PrefixTuningConfig(task_type=task_type, num_virtual_tokens=5))
    peft.prompt_encoder.default.embedding.weight.data.copy_(ours.prefix_encoder.embedding.weight.data)
    return peft.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_loss_equal_peft_seq_cls_prefix_tuning(family):
    ours = prefixed(family)
    peft = peft_twin(ours, family)
    ids, mask = random_batch(family)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = ours(ids, mask, labels=labels)
        ref = peft(input_ids=ids, attention_mask=mask, labels=labels)
        plain = tiny_encoder(family)(input_ids=ids, attention_mask=mask).logits
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    assert (out.logits - plain).abs().max() > 1e-2  # the prefix really reaches the encoder


def test_bert_sentence_pair_token_types_equal_peft():
    ours = prefixed("bert")
    peft = peft_twin(ours, "bert")
    ids, mask = random_batch("bert")
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    with torch.no_grad():
        a = ours(ids, mask, token_type_ids=types).logits
        b = peft(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        c = ours(ids, mask).logits
    assert (a - b).abs().max() <= 1e-5
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task_type", ["token_cls", "qa"])
def test_right_padding_does_not_change_a_row(family, task_type):
    model = prefixed(family, task_type)
    ids, mask = random_batch(family, right_pad=3)
    with torch.no_grad():
        out = model(ids, mask)
        alone = model(ids[1:2, :6])
    first = lambda o: o.logits if task_type == "token_cls" else o.start_logits  # noqa: E731
    assert (first(out)[1, :6] - first(alone)[0]).abs().max() <= 1e-5


def test_attention_to_the_prefix_is_bidirectional_and_unmasked():
    """Every token, the last included, sees every prefix position: changing any prefix row changes every output."""
    model = prefixed("bert", "token_cls")
    ids, mask = random_batch("bert", right_pad=0)
    with torch.no_grad():
        before = model(ids, mask).logits
        for row in range(model.prefix_config.pre_seq_len):
            model.prefix_encoder.embedding.weight[row] += 1.0
            after = model(ids, mask).logits
            assert ((after - before).abs().amax(dim=-1) > 1e-4).all()
            before = after


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("projection", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(family, projection):
    model = prefixed(family, prefix_projection=projection, prefix_hidden_size=16)
    ids, mask = random_batch(family)
    labels = torch.tensor([0, 2, 1])

    def grads():
        model.zero_grad()
        model.train()
        model(ids, mask, labels=labels).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        assert (a - b).abs().max() <= 1e-6


@pytest.mark.parametrize("family,task_type,head", [("bert", "seq_cls", "classifier"), ("roberta", "seq_cls", "classifier"),
                                                   ("electra", "token_cls", "classifier"), ("bert", "qa", "qa_outputs")])
def test_training_changes_only_prefix_and_head_and_loss_goes_down(family, task_type, head):
    model = prefixed(family, task_type, prefix_projection=True, prefix_hidden_size=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("prefix_encoder.", f"base.{head}."))}
    backbone = model.base.base_model_prefix
    frozen_before = {k: v.clone() for k, v in model.base.state_dict().items() if k.startswith(backbone + ".")}
    head_before = {k: v.clone() for k, v in model.base.state_dict().items() if not k.startswith(backbone + ".")}
    ids, mask = random_batch(family)
    if task_type == "seq_cls":
        targets = dict(labels=torch.tensor([0, 2, 1]))
    elif task_type == "token_cls":
        targets = dict(labels=torch.where(mask.bool(), ids % 3, -100))
    else:
        targets = dict(start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([2, 4, 5]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(25):
        loss = model(ids, mask, **targets).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    state = model.base.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in frozen_before.items())
    assert all(not torch.equal(v, state[k]) for k, v in head_before.items())


def test_unsupported_encoder_and_decoder_mode_are_refused():
    with pytest.raises(UserError, match="'deberta-v2' is not supported.*bert, electra, roberta"):
        check_encoder(DebertaV2Config())
    with pytest.raises(UserError, match="decoder"):
        check_encoder(tiny_config("bert", is_decoder=True))
    with pytest.raises(UserError, match="position_offset"):
        attach_prefix(tiny_encoder("bert"), "seq_cls", ["a", "b", "c"], 4, position_offset=False)
    with pytest.raises(UserError, match="--task_type"):
        attach_prefix(tiny_encoder("bert"), "ner", ["a", "b", "c"], 4)


@pytest.mark.parametrize("family,budget", [("bert", 80 - 8), ("roberta", 80 - 2 - 8)])
def test_sequence_length_must_fit_positions_after_the_prefix(family, budget):
    config = tiny_config(family)
    check_length(config, 8, budget)
    with pytest.raises(UserError, match=f"--max_source_length {budget} or less"):
        check_length(config, 8, budget + 1)
    model = attach_prefix(tiny_encoder(family), "seq_cls", ["a", "b", "c"], 8)
    ids = torch.full((1, budget), 7)
    with torch.no_grad():
        model(ids)  # the longest allowed input runs


def test_wrapper_is_a_prefix_tuned_encoder_with_the_task_in_its_config():
    model = prefixed("electra", "token_cls")
    assert isinstance(model, PrefixTunedEncoder)
    assert model.prefix_config.task_type == "token_cls" and model.prefix_config.labels == ["a", "b", "c"]
    assert model.prefix_config.base_architecture == "ElectraForTokenClassification"
    assert model.prefix_config.hidden_size == 32 and model.prefix_config.num_layers == 2
