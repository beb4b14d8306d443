"""Prefix initialised from a text's keys/values reproduces the base model reading that text first, exactly."""

import pytest
import torch

from ptuning.errors import UserError
from ptuning.model import attach_prefix
from ptuning.prefix_init import init_prefix_from_text, init_text_ids, text_key_values
from tiny_models import make_tokenizer, tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "glm"])
def test_step0_logits_equal_base_with_text_prepended(arch):
    tokenizer = make_tokenizer()
    text = "Answer: <x>!"  # 12 characters = 12 tokens
    model = attach_prefix(tiny_model(arch), pre_seq_len=12).eval()
    ids = init_prefix_from_text(model, tokenizer, text)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(3)
    inputs = torch.randint(8, 100, (2, 7), generator=g)
    with torch.no_grad():
        prefixed = model(inputs).logits
        prompted = model.base(torch.cat([torch.tensor([ids] * 2), inputs], dim=1)).logits[:, len(ids):]
    torch.testing.assert_close(prefixed, prompted, rtol=1e-5, atol=1e-5)
    # and generation: the same greedy tokens as the prompted base
    with torch.no_grad():
        gen = model.generate(inputs, torch.ones_like(inputs), max_new_tokens=5, do_sample=False, pad_token_id=0)
        ref = model.base.generate(torch.cat([torch.tensor([ids] * 2), inputs], dim=1), max_new_tokens=5,
                                  do_sample=False, pad_token_id=0)
    assert gen[:, inputs.shape[1]:].tolist() == ref[:, len(ids) + inputs.shape[1]:].tolist()


def test_layout_is_per_layer_keys_then_values():
    model = attach_prefix(tiny_model("llama"), pre_seq_len=4).eval()
    ids = torch.tensor([5, 6, 7, 8])
    flat = text_key_values(model.base, ids)
    cache = model.base(input_ids=ids[None], use_cache=True).past_key_values
    model.prefix_encoder.embedding.weight.data.copy_(flat)
    kv = model.prefix_encoder.key_values(1, torch.float32)
    for (k, v), layer in zip(kv, cache.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


def test_text_is_truncated_or_repeated_to_the_prefix_length():
    tokenizer = make_tokenizer()
    assert init_text_ids(tokenizer, "abc", 7) == init_text_ids(tokenizer, "abcabca", 7)
    assert init_text_ids(tokenizer, "abcdefgh", 3) == init_text_ids(tokenizer, "abc", 3)


def test_refused_with_projection_and_empty_text():
    tokenizer = make_tokenizer()
    model = attach_prefix(tiny_model("llama"), pre_seq_len=4, prefix_projection=True, prefix_hidden_size=8)
    with pytest.raises(UserError, match="--prefix_projection"):
        init_prefix_from_text(model, tokenizer, "abcd")
    with pytest.raises(UserError, match="no tokens"):
        init_prefix_from_text(attach_prefix(tiny_model("llama"), pre_seq_len=4), tokenizer, "")


def test_auto_starts_from_the_first_training_examples(tmp_path):
    from ptuning.args import PtuningTrainingArguments
    from ptuning.data import Collator, encode_dataset
    from ptuning.train import PrefixTrainer, apply_quality_levers
    from tiny_models import CHATML

    tokenizer = make_tokenizer(CHATML)
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": a, "loss": True}]
            for q, a in (("q1", "a1"), ("q22", "a22"))]
    data = encode_dataset(rows, "t", tokenizer, 32, 8)
    first_two = data["input_ids"][0] + data["input_ids"][1]
    model = attach_prefix(tiny_model("llama", vocab_size=len(tokenizer)), pre_seq_len=len(first_two) - 3).eval()
    args = PtuningTrainingArguments(output_dir=str(tmp_path), prefix_init_text="auto", use_cpu=True, report_to="none")
    trainer = PrefixTrainer(model=model, args=args, train_dataset=data,
                            data_collator=Collator(pad_token_id=tokenizer.pad_token_id))
    apply_quality_levers(trainer, tokenizer, args)
    expected = text_key_values(model.base, torch.tensor(first_two[: len(first_two) - 3]))
    assert torch.equal(model.prefix_encoder.embedding.weight.data, expected)
