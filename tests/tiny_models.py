"""Tiny random-weight models of every supported architecture, built from config classes (no downloads)."""

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers import (GPT2Config, GPT2LMHeadModel, Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "glm": (GlmConfig, GlmForCausalLM, {}),
    "glm4": (Glm4Config, Glm4ForCausalLM, {}),
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
                                               embd_pdrop=0.0, attn_pdrop=0.0)),
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A 2-layer fp32 model in eval mode, with GQA (2 kv heads for 4 query heads) where the family has it."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    kwargs = dict(COMMON) if arch != "gpt2" else dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    return model_cls(config).eval()


def batch(batch_size: int = 2, seq_len: int = 9, left_pad: int = 0, seed: int = 1):
    """Random ids, a mask with ``left_pad`` pads on row 1, and labels that ignore the first third of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1, :left_pad] = 0
        ids[1, :left_pad] = 0
    labels = ids.clone()
    labels[:, : seq_len // 3] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def train_prefix(model, ids, mask, labels, steps: int, lr: float = 5e-2) -> list[float]:
    """AdamW on the prefix alone for ``steps`` steps on one batch; the loss of each step."""
    opt = torch.optim.AdamW(model.prefix_encoder.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"] + list("问答：你好世界")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """One token per character; the plain variant adds <s> like a Llama tokenizer, the template one does not."""
    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if chat_template is None:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=chat_template)


def save_tiny_checkpoint(path, arch: str = "llama", chat_template: str | None = CHATML, seed: int = 0,
                         initializer_range: float = 0.2) -> str:
    """A tiny model + character tokenizer saved with save_pretrained, loadable like any local checkpoint.

    Weights larger than the default init give logits a prefix can move far enough to learn a fixed reply.
    """
    tokenizer = make_tokenizer(chat_template)
    model = tiny_model(arch, seed=seed, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       initializer_range=initializer_range)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
