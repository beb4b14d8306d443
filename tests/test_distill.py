"""Self-distillation from the frozen base: the KL term, its gradients, and its hook in PrefixTrainer."""

import torch
from torch.nn import functional as F

from ptuning.args import PtuningTrainingArguments
from ptuning.data import Collator, encode_dataset
from ptuning.distill import RetentionDistiller, kl_to_base, retention_conversations
from ptuning.model import attach_prefix
from ptuning.train import PrefixTrainer, apply_quality_levers
from tiny_models import CHATML, batch, make_tokenizer, tiny_model


def _model(seed=0):
    tokenizer = make_tokenizer(CHATML)
    base = tiny_model("llama", vocab_size=max(128, len(tokenizer)), eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    torch.manual_seed(seed)
    return attach_prefix(base, pre_seq_len=3), tokenizer


def test_kl_is_the_base_to_prefixed_kl_on_target_tokens_only():
    model, _ = _model()
    ids, mask, labels = batch(left_pad=0)
    kl = kl_to_base(model, ids, mask, labels)
    with torch.no_grad():
        student = F.log_softmax(model(ids, mask).logits[:, :-1], -1)
        teacher = F.log_softmax(model.base(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    select = labels[:, 1:] != -100
    torch.testing.assert_close(kl, per_token[select].mean(), rtol=1e-5, atol=1e-7)
    assert kl > 1e-4  # a random prefix moves the model away from the base


def test_kl_is_zero_when_the_prefixed_model_is_the_base():
    model, _ = _model()
    ids, mask, labels = batch()
    with torch.no_grad():
        base_logits = model.base(input_ids=ids, attention_mask=mask).logits
    # a prefix run through the bare base: student == teacher
    model.forward = lambda input_ids, attention_mask=None, **_: type("O", (), {"logits": base_logits})()
    assert kl_to_base(model, ids, mask, labels).item() == 0.0


def test_kl_gradient_reaches_only_the_prefix():
    model, _ = _model()
    model.train()
    ids, mask, labels = batch()
    kl_to_base(model, ids, mask, labels).backward()
    assert model.prefix_encoder.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.base.parameters())


def test_distiller_trains_on_the_base_models_own_replies():
    model, tokenizer = _model()
    prompts = [[{"role": "user", "content": t}] for t in ("hi", "abc", "xyz?")]
    distiller = RetentionDistiller(model, tokenizer, prompts, weight=0.5, rows=2, max_new_tokens=4, seed=1)
    with model.prefix_disabled():
        from ptuning.infer import generate_replies
        replies = generate_replies(model, tokenizer, prompts, max_new_tokens=4)
    for example, reply in zip(distiller.examples, replies):
        trained = [t for t in example["labels"] if t != -100]
        assert tokenizer.decode(trained, skip_special_tokens=True).strip() == reply
    seen = []
    for _ in range(3):
        b = distiller.next_batch()
        seen += [tuple(r[m.bool()].tolist()) for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert len(set(seen)) == 3  # round robin: every prompt within two epochs of 2-row batches


def test_trainer_adds_the_weighted_kl_to_the_task_loss(tmp_path):
    model, tokenizer = _model()
    rows = [[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "loss": True}],
            [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "loss": True}]]
    train_set = encode_dataset(rows, "t", tokenizer, 32, 8)
    args = PtuningTrainingArguments(output_dir=str(tmp_path), kl_weight=0.5, retention_rows=2, use_cpu=True,
                                    report_to="none", seed=7)
    trainer = PrefixTrainer(model=model, args=args, train_dataset=train_set,
                            data_collator=Collator(pad_token_id=tokenizer.pad_token_id))
    apply_quality_levers(trainer, tokenizer, args)
    twin = RetentionDistiller(model, tokenizer, retention_conversations(None), 0.5, 2, seed=7)
    model.train()
    inputs = Collator(pad_token_id=tokenizer.pad_token_id)([train_set[0], train_set[1]])
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        total = trainer.compute_loss(model, dict(inputs))
        expected = model(**inputs).loss + twin.loss(model)
    torch.testing.assert_close(total, expected)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.compute_loss(model, dict(inputs)), model(**inputs).loss)  # evaluation: no KL


def test_kl_training_keeps_the_model_closer_to_the_base(tmp_path):
    """Same task steps with and without the KL term: with it, the prefixed model ends nearer the base on the
    retention prompts."""
    kls = []
    for weight in (0.0, 5.0):
        model, tokenizer = _model(seed=0)
        rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "ZZZZ", "loss": True}] for i in range(4)]
        train_set = encode_dataset(rows, "t", tokenizer, 32, 8)
        args = PtuningTrainingArguments(output_dir=str(tmp_path / str(weight)), kl_weight=weight, retention_rows=4,
                                        use_cpu=True, report_to="none", max_steps=20, learning_rate=1e-1,
                                        per_device_train_batch_size=4, save_strategy="no", logging_steps=100,
                                        lr_scheduler_type="constant")
        trainer = PrefixTrainer(model=model, args=args, train_dataset=train_set,
                                data_collator=Collator(pad_token_id=tokenizer.pad_token_id))
        apply_quality_levers(trainer, tokenizer, args)
        trainer.train()
        probe = RetentionDistiller(model, tokenizer, retention_conversations(None)[:8], 1.0, 8, seed=0)
        with torch.no_grad():
            kls.append(probe.loss(model.eval()).item())
    assert kls[1] < 0.5 * kls[0], kls


def test_prefix_learning_rate_default_is_the_measured_one():
    from ptuning.args import parse_args

    *_, training = parse_args(["--model_name_or_path", "m", "--output_dir", "/tmp/x"])
    assert training.learning_rate == 3e-2  # bench/results/quality.md: 5e-5 ends at 0 % format and 0 % facts
