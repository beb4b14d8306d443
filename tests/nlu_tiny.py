"""Tiny random encoders (BERT, RoBERTa, ELECTRA, XLM-R) and a WordPiece tokenizer written to a local vocab file."""

import os

import torch
from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, BertConfig, BertTokenizerFast, ElectraConfig,
                          RobertaConfig, XLMRobertaConfig)

ENCODERS = {
    "bert": (BertConfig, {}),
    "roberta": (RobertaConfig, dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)),
    "electra": (ElectraConfig, dict(embedding_size=16)),
    "xlm-roberta": (XLMRobertaConfig, dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)),
}
AUTO = {"seq_cls": AutoModelForSequenceClassification, "token_cls": AutoModelForTokenClassification,
        "qa": AutoModelForQuestionAnswering}

WORDS = ("the a an is was of in on and to it this that movie film great good bad awful terrible fine nice love hate "
         "boring fun plot acting paris london berlin alice bob carol lives works visited city capital france "
         "germany england who where what when capital").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'-")


def vocab() -> list[str]:
    return SPECIALS + sorted(set(WORDS)) + CHARS + ["##" + c for c in CHARS]


def write_tokenizer(path) -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer from a vocab file written here: whole words, characters, ##characters."""
    os.makedirs(path, exist_ok=True)
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab()) + "\n")
    tokenizer = BertTokenizerFast(vocab=vocab_file, do_lower_case=True)
    tokenizer.save_pretrained(path)
    return tokenizer


def tiny_config(family: str = "bert", **overrides):
    config_cls, extra = ENCODERS[family]
    kwargs = dict(vocab_size=len(vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=80, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, initializer_range=0.2)
    kwargs.update(extra)
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_encoder(family: str = "bert", task_type: str = "seq_cls", num_labels: int = 3, seed: int = 0, **overrides):
    """A 2-layer fp32 encoder with a task head in eval mode; large init so a prefix visibly moves its logits."""
    config = tiny_config(family, **overrides)
    if task_type != "qa":
        config.num_labels = num_labels
    model_cls = AUTO[task_type]._model_mapping[type(config)]
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    return model_cls(config).eval()


def save_tiny_encoder(path, family: str = "bert", seed: int = 0, **overrides) -> str:
    """A tiny masked-LM-less backbone checkpoint + tokenizer, loadable by every ``AutoModelFor<task>``."""
    from transformers import AutoModel

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(path)
    write_tokenizer(path)
    return str(path)


def random_batch(family: str = "bert", batch_size: int = 3, seq_len: int = 9, right_pad: int = 3, seed: int = 1):
    """Random ids framed by [CLS] … [SEP]; row 1 is right-padded by ``right_pad``."""
    config = tiny_config(family)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch_size, seq_len), generator=g)
    ids[:, 0] = 2
    ids[:, -1] = 3
    mask = torch.ones_like(ids)
    if right_pad:
        mask[1, seq_len - right_pad :] = 0
        ids[1, seq_len - right_pad :] = config.pad_token_id
        ids[1, seq_len - right_pad - 1] = 3
    return ids, mask
