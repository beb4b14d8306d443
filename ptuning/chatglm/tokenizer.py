"""A fast tokenizer equal to the original ChatGLM2/3 (sentencepiece) or GLM-4 (tiktoken) tokenizer."""

from __future__ import annotations

import base64
import os

from ..errors import UserError
from .detect import read_json

SP_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
SP_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatGLM2's build_prompt: rounds counted from 1, the reply follows "答：" directly.
CHATGLM2_TEMPLATE = (
    "[gMASK]sop{% set ns = namespace(round=1, text='') %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}[Round {{ ns.round }}]\n\n问：{{ m['content'] }}\n\n答："
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% set ns.round = ns.round + 1 %}{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}")
# ChatGLM3's build_single_message encodes "\n" and the content separately, each with sentencepiece's dummy prefix;
# the space after "\n" becomes exactly that second "▁" under Metaspace(prepend_scheme="always").
CHATGLM3_TEMPLATE = (
    "[gMASK]sop{% for m in messages %}<|{{ 'observation' if m['role'] == 'tool' else m['role'] }}|>\n "
    "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
# A tool result is ChatGLM's "observation" turn.
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ 'observation' if m['role'] == 'tool' else m['role'] }}|>\n"
    "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _sentencepiece_backend(model_file: str, specials: list[str]):
    """A ``tokenizers.Tokenizer`` equal to ``SentencePieceProcessor.encode`` for ChatGLM's BPE model, with
    ``specials`` appended at ids ``vocab, vocab + 1, ...`` as ChatGLM's SPTokenizer numbers them."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    proto = import_protobuf().ModelProto()
    with open(model_file, "rb") as f:
        data = f.read()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError, whose module differs between protobuf backends
        raise UserError(f"{model_file}: not a sentencepiece model ({type(e).__name__})") from None
    if not proto.pieces:
        raise UserError(f"{model_file}: not a sentencepiece model (no pieces)")
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # ChatGLM2/3 ship BPE models
        raise UserError(f"{model_file}: sentencepiece model type {trainer.model_type} is not BPE; not a ChatGLM "
                        "tokenizer")
    if trainer.treat_whitespace_as_suffix or not norm.escape_whitespaces:
        raise UserError(f"{model_file}: sentencepiece whitespace options this converter cannot reproduce exactly")
    vocab_scores = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
    merges = generate_merges(vocab, vocab_scores)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=trainer.unk_piece, fuse_unk=True,
                                   byte_fallback=trainer.byte_fallback))
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    # The dummy prefix goes on every piece of text between special tokens, as on each separately encoded piece in
    # the original (transformers' default Metaspace "first" drops it after a role token), and unconditionally, as
    # sentencepiece does (Metaspace skips it when the text already starts with a space).
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    # "sop"/"eop" are plain words too: only a standalone word is the special token ("isopropyl" stays text)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False, single_word=t in ("sop", "eop"))
                                for t in specials])
    control = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (2, 3)}
    return backend, len(proto.pieces), control


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """``base64-token rank`` lines, the format of GLM-4's ``tokenizer.model`` (read without tiktoken)."""
    ranks = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise UserError(f"{path}: line {n}: expected 'base64-token rank'") from None
    return ranks


def _tiktoken_backend(model_file: str, specials: list[str]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Ranks(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(read_tiktoken_ranks)

    vocab, merges = Ranks(model_file).extract_vocab_merges_from_model(model_file)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError(f"{model_file}: token ranks are not 0..{len(vocab) - 1}")
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return backend, len(vocab)


def build_tokenizer(path: str, gen: str):
    """The fast tokenizer (a ``PreTrainedTokenizerFast``) for an original ChatGLM directory."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    model_file = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(model_file):
        raise UserError(f"{path}: no tokenizer.model to build the tokenizer from")
    if gen == "glm4":
        backend, base = _tiktoken_backend(model_file, GLM4_SPECIALS)
        ids = {t: base + i for i, t in enumerate(GLM4_SPECIALS)}
        prefix = ["[gMASK]", "<sop>"]
        source_config = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        template = source_config.get("chat_template") or GLM4_TEMPLATE
        kwargs = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="[gMASK]")
        eos_id = ids["<|endoftext|>"]
    else:
        specials = SP_SPECIALS + (SP_ROLES if gen == "chatglm3" else [])
        backend, base, control = _sentencepiece_backend(model_file, specials)
        ids = {t: base + i for i, t in enumerate(specials)}
        prefix = ["[gMASK]", "sop"]
        template = CHATGLM3_TEMPLATE if gen == "chatglm3" else CHATGLM2_TEMPLATE
        eos, unk = "</s>", "<unk>"
        kwargs = dict(eos_token=eos, pad_token=unk, unk_token=unk, bos_token="[gMASK]")
        eos_id = control.get(eos, 2)
    eos_piece = kwargs["eos_token"]
    # the original's build_inputs_with_special_tokens: [gMASK] sop A (+ B eos for pairs)
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(prefix) + " $A", pair=" ".join(prefix) + f" $A $B {eos_piece}",
        special_tokens=[(t, ids[t]) for t in prefix] + [(eos_piece, eos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side="left", clean_up_tokenization_spaces=False, chat_template=template,
        model_input_names=["input_ids", "attention_mask"], **kwargs)
    for token, expected in ids.items():  # the embedding rows were trained for these ids
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise UserError(f"{model_file}: special token {token} would get id {got}, the original uses {expected}")
    return tokenizer


def stop_token_ids(tokenizer, gen: str, raw: dict) -> list[int]:
    """Generation stops on eos and, for the chat generations, on the next turn's role token."""
    eos = raw.get("eos_token_id", tokenizer.eos_token_id)
    ids = list(eos) if isinstance(eos, list) else [eos]
    if gen != "chatglm2":
        ids += [tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|observation|>")]
    return list(dict.fromkeys(i for i in ids if i is not None))
