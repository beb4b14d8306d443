"""One base, several prefixes in one batch: every row equals that row run alone with its own prefix."""

import pytest
import torch

from ptuning.errors import UserError
from ptuning.export import save_prefix
from ptuning.infer import generate_replies
from ptuning.model import attach_prefix
from ptuning.serving import MultiPrefixModel, load_multi
from tiny_models import VOCAB, save_tiny_checkpoint, tiny_model

# (pre_seq_len, position_offset): two lengths, and a ChatGLM-style prefix whose positions are not shifted
PREFIXES = {"a": (3, True), "b": (6, True), "c": (3, False), "d": (6, False)}


def prefix_models(base):
    models = {}
    for i, (name, (p, offset)) in enumerate(PREFIXES.items()):
        model = attach_prefix(base, p, position_offset=offset)
        torch.manual_seed(10 + i)
        torch.nn.init.normal_(model.prefix_encoder.embedding.weight, std=0.5)
        models[name] = model
    return models


def rows(seed=3):
    """Five prompts of different lengths, left-padded into one batch."""
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 9, 5, 9]
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return prompts, ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen2", "glm", "gpt2"])
def test_each_row_equals_running_it_alone_with_its_own_prefix(arch):
    base = tiny_model(arch)
    singles = prefix_models(base)
    multi = MultiPrefixModel(base, singles)
    prompts, ids, mask = rows()
    chosen = ["a", "b", "c", "d", "a"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        logits = multi(ids, mask, prefix_ids=chosen).logits
        generated = multi.generate(ids, mask, prefix_ids=chosen, **kw)[:, ids.shape[1]:]
        for row, (name, prompt) in enumerate(zip(chosen, prompts)):
            alone = singles[name](prompt[None]).logits[0]
            assert (logits[row, -len(prompt):] - alone).abs().max() <= 1e-5, (row, name)
            alone_tokens = singles[name].generate(prompt[None], **kw)[0, len(prompt):]
            assert torch.equal(generated[row], alone_tokens), (row, name)


def test_prefixes_really_differ_and_indices_select_by_load_order():
    base = tiny_model("llama")
    multi = MultiPrefixModel(base, prefix_models(base))
    _, ids, mask = rows()
    with torch.no_grad():
        by_name = multi(ids, mask, prefix_ids=["a", "b", "c", "d", "b"]).logits
        by_index = multi(ids, mask, prefix_ids=torch.tensor([0, 1, 2, 3, 1])).logits
        all_a = multi(ids, mask, prefix_ids="a").logits
    assert torch.equal(by_name, by_index)
    assert (by_name[1] - all_a[1]).abs().max() > 1e-3


def test_beams_repeat_each_rows_own_prefix():
    base = tiny_model("llama")
    singles = prefix_models(base)
    multi = MultiPrefixModel(base, singles)
    prompts, ids, mask = rows()
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        out = multi.generate(ids[:2], mask[:2], prefix_ids=["b", "c"], **kw)[:, ids.shape[1]:]
        for row, name in enumerate(["b", "c"]):
            alone = singles[name].generate(prompts[row][None], **kw)[:, len(prompts[row]):]
            assert torch.equal(out[2 * row: 2 * row + 2], alone)


def test_checkpoints_load_onto_one_base_and_batched_replies_follow_each_prefix(tmp_path):
    model_dir = save_tiny_checkpoint(tmp_path / "model")
    multi, tokenizer = load_multi(model_dir, {})
    for name, model in prefix_models(multi.base).items():
        save_prefix(model, str(tmp_path / name))
        multi.add_prefix(name, str(tmp_path / name))
    assert multi.names == list(PREFIXES)
    conversations = [[{"role": "user", "content": text}] for text in ("hi", "hello there", "what?", "ok")]
    chosen = ["a", "d", "b", "c"]
    batched = generate_replies(multi, tokenizer, conversations, max_new_tokens=5, batch_size=3, prefix_ids=chosen)
    for conversation, name, reply in zip(conversations, chosen, batched):
        single = MultiPrefixModel(multi.base, {name: str(tmp_path / name)})
        assert generate_replies(single, tokenizer, [conversation], max_new_tokens=5, prefix_ids=name) == [reply]


def test_errors_name_the_problem():
    base = tiny_model("llama")
    multi = MultiPrefixModel(base, prefix_models(base))
    _, ids, mask = rows()
    with pytest.raises(UserError, match="unknown prefix 'zzz'"):
        multi(ids, mask, prefix_ids=["a", "b", "c", "d", "zzz"])
    with pytest.raises(UserError, match="one prefix per row"):
        multi(ids, mask, prefix_ids=["a"])
    with pytest.raises(UserError, match="already loaded"):
        multi.add_prefix("a", attach_prefix(base, 2))
    other = attach_prefix(tiny_model("llama", num_hidden_layers=3), 2)
    with pytest.raises(UserError, match="num_layers is 3"):
        multi.add_prefix("other", other)
