"""ptuning.decode's static-cache loop gives generate()'s greedy ids token for token: single, batched, left-padded and
multi-prefix inputs, several architectures, every step mode that runs on CPU."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from ptuning import decode
from ptuning.model import attach_prefix
from ptuning.serving import MultiPrefixModel
from tiny_models import VOCAB, batch, tiny_model

GREEDY = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)


def prefixed(arch, pre_seq_len=4, seed=0, position_offset=True, base=None):
    """A tiny base (or ``base``) with a random (not zero-initialised) prefix; weights large enough to make tokens
    differ."""
    base = base if base is not None else tiny_model(arch, initializer_range=0.2)
    model = attach_prefix(base, pre_seq_len, position_offset=position_offset)
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 7))
    return model.eval()


def reference(model, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, **{**GREEDY, **kw})


def assert_same(model, ids, mask, mode="eager", **kw):
    want = reference(model, ids, mask, **kw)
    got = decode.generate(model, ids, mask, mode=mode, **{**GREEDY, **kw})
    assert got.shape == want.shape and torch.equal(got, want), (got, want)
    return got


CASES = {"single": dict(batch_size=1, left_pad=0), "batched": dict(batch_size=3, left_pad=0),
         "left-padded": dict(batch_size=3, left_pad=4)}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "glm", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_prefix_and_bare_base_match_generate(arch, case, mode):
    model = prefixed(arch)
    ids, mask, _ = batch(seq_len=9, seed=3, **CASES[case])
    out = assert_same(model, ids, mask, mode)
    assert out.shape[1] == 9 + GREEDY["max_new_tokens"] and len(set(out[:, 9:].flatten().tolist())) > 2
    with model.prefix_disabled():
        assert_same(model, ids, mask, mode)
    assert_same(model.base, ids, mask, mode)


@pytest.mark.parametrize("mode", ["eager", "static", "cuda_graph"])
def test_chatglm_positions_without_offset(mode):
    model = prefixed("glm", position_offset=False)
    ids, mask, _ = batch(batch_size=2, seq_len=7, left_pad=2)
    assert_same(model, ids, mask, mode)  # cuda_graph on a CPU tensor runs the uncaptured static step


@pytest.mark.parametrize("arch", ["llama", "mistral", "glm4"])
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_multi_prefix_batch_matches_its_generate(arch, mode):
    a = prefixed(arch, pre_seq_len=3, seed=1)
    b = prefixed(arch, pre_seq_len=6, seed=2, position_offset=False, base=a.base)
    multi = MultiPrefixModel(a.base, {"a": a, "b": b}).eval()
    ids, mask, _ = batch(batch_size=3, seq_len=8, left_pad=3, seed=5)
    rows = ["a", "b", "a"]
    want = multi.generate(ids, mask, prefix_ids=rows, **GREEDY)
    got = decode.generate(multi, ids, mask, prefix_ids=rows, mode=mode, **GREEDY)
    assert torch.equal(got, want)
    alone = decode.generate(b, ids[1:2], mask[1:2], **GREEDY)  # a row gets what its own prefix model gives it
    new = alone.shape[1] - 8
    assert torch.equal(got[1:2, 8:8 + new], alone[:, 8:]) and (got[1, 8 + new:] == 0).all()


def test_eos_stops_rows_and_pads_them_like_generate():
    model = prefixed("llama")
    ids, mask, _ = batch(batch_size=3, seq_len=9, left_pad=2, seed=3)
    free = reference(model, ids, mask)
    eos = int(free[0, 9 + 2])  # row 0 emits it at its third step: that row stops early, the others go on or stop
    out = assert_same(model, ids, mask, eos_token_id=eos)
    assert (out[0, 9 + 3:] == 0).all()  # padded after its EOS
    assert_same(model, ids, mask, eos_token_id=[eos, int(free[1, 9 + 1])])


def test_min_new_tokens_and_repetition_penalty_match():
    model = prefixed("qwen2")
    ids, mask, _ = batch(batch_size=2, seq_len=9, left_pad=3, seed=4)
    eos = int(reference(model, ids, mask)[0, 9])
    assert_same(model, ids, mask, eos_token_id=eos, min_new_tokens=5)
    assert_same(model, ids, mask, repetition_penalty=1.3)


def test_sampling_and_beams_take_the_reference_path():
    model = prefixed("llama")
    ids, mask, _ = batch(batch_size=2, seq_len=6)
    for kw in (dict(do_sample=True, top_k=5), dict(num_beams=2), dict(no_repeat_ngram_size=2)):
        torch.manual_seed(0)
        want = reference(model, ids, mask, **kw)
        torch.manual_seed(0)
        assert torch.equal(decode.generate(model, ids, mask, **{**GREEDY, **kw}), want)
        assert decode._fast_path_config(model, {**GREEDY, **kw}) is None
    assert decode._fast_path_config(model, dict(GREEDY)) is not None


def test_prefix_key_values_computed_once_per_prefix_weights():
    model = prefixed("llama")
    calls = []
    original = model.prefix_encoder.key_values
    model.prefix_encoder.key_values = lambda *a, **k: calls.append(1) or original(*a, **k)
    ids, mask, _ = batch(batch_size=2, seq_len=6)
    for _ in range(3):
        decode.generate(model, ids, mask, **GREEDY)
    assert len(calls) == 1
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.add_(0.3)  # an optimizer step: a new prefix
    got = decode.generate(model, ids, mask, **GREEDY)
    assert len(calls) == 2
    assert torch.equal(got, reference(model, ids, mask))


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_streamer_sees_what_generate_streams():
    model = prefixed("glm")
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    want, got = Recorder(), Recorder()
    reference(model, ids, mask, streamer=want)
    decode.generate(model, ids, mask, streamer=got, **GREEDY)
    assert got.puts == want.puts and got.ended and want.ended


def test_static_cache_is_preallocated_and_seeded_with_the_prefix():
    model = prefixed("llama", pre_seq_len=5)
    kv = [(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)) for k, v in decode.prefix_key_values(model)]
    cache = decode.static_prefix_cache(kv, max_cache_len=20)
    layer = cache.layers[0]
    assert layer.keys.shape == (2, 2, 20, 8) and cache.get_seq_length() == 5
    assert torch.equal(layer.keys[:, :, :5], kv[0][0]) and not layer.keys[:, :, 5:].any()
    keys, _ = layer.update(torch.ones(2, 2, 3, 8), torch.ones(2, 2, 3, 8))
    assert keys.shape[-2] == 8 and keys.data_ptr() == layer.keys.data_ptr()  # a view of the buffer, no copy


def test_replies_and_chat_use_the_fast_path_with_the_same_text():
    from ptuning.chat import chat
    from ptuning.infer import generate_replies
    from tiny_models import CHATML, make_tokenizer

    tokenizer = make_tokenizer(CHATML)
    model = prefixed("qwen2")
    model.base.generation_config.eos_token_id = tokenizer.eos_token_id
    conversations = [[{"role": "user", "content": text}] for text in ("hi", "a longer question?", "ok")]
    fast = generate_replies(model, tokenizer, conversations, max_new_tokens=8, batch_size=2)
    assert fast == generate_replies(model, tokenizer, conversations, max_new_tokens=8, batch_size=2, fast=False)
    assert any(fast)
    reply, _ = chat(model, tokenizer, "hi", max_new_tokens=8)
    assert reply == fast[0]
