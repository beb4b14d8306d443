"""Load a frozen causal LM and wrap it with a trainable prefix fed to every attention layer."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import chatglm
from .errors import UserError, model_source_error
from .memory import check_quantization_zero
from .capability import check_model
from .prefix import PrefixConfig, PrefixEncoder, generation_cache, model_geometry, read_only_cache

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def check_architecture(config, model=None) -> str:
    """The architecture name when a prefix can reach every attention layer of this model (decided by running it,
    ``ptuning.capability``), else ``UserError`` naming the model type and the reason."""
    return check_model(config, model)


def quantization_config(bits: int | None, compute_dtype, quant_type: str = "nf4", double_quant: bool = False):
    if not bits:
        return None
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.bfloat16,
        )
    raise UserError(f"--quantization_bit: expected 4 or 8, got {bits}")


def load_base_model(name_or_path: str, torch_dtype: str = "auto", trust_remote_code: bool = False,
                    quantization_bit: int | None = None, quant_type: str = "nf4", double_quant: bool = False):
    """Load tokenizer and frozen model from a local directory or hub id, refusing models a prefix cannot reach
    before any weight is read."""
    if torch_dtype not in DTYPES:
        raise UserError(f"--torch_dtype: expected one of {sorted(DTYPES)}, got {torch_dtype!r}")
    if not trust_remote_code:  # an original remote-code ChatGLM directory loads as its GlmForCausalLM conversion
        name_or_path = chatglm.resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise model_source_error(name_or_path, e) from None
    check_architecture(config)
    if quantization_bit and is_deepspeed_zero3_enabled():
        check_quantization_zero(quantization_bit, 3)
    dtype = DTYPES[torch_dtype]
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        quantization_config=quantization_config(quantization_bit, dtype, quant_type, double_quant),
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _activation_dtype(model) -> torch.dtype:
    """The dtype the attention computes in (the embeddings' dtype, also for 4/8-bit bases)."""
    return model.get_input_embeddings().weight.dtype


class PrefixModelBase(nn.Module):
    """A frozen ``base`` and an fp32 ``prefix_encoder`` by its embeddings, shared by the causal and encoder wrappers."""

    def __init__(self, base: nn.Module, prefix_config: PrefixConfig):
        super().__init__()
        base.requires_grad_(False)
        self.base = base
        self.prefix_config = prefix_config
        device = base.get_input_embeddings().weight.device
        self.prefix_encoder = PrefixEncoder(prefix_config).to(device=device, dtype=torch.float32)

    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.prefix_encoder.embedding.weight.device

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        """Non-reentrant checkpointing that keeps the read-only prefix cache inside each recomputed layer."""
        if not getattr(self.base, "supports_gradient_checkpointing", True):
            raise UserError(f"--gradient_checkpointing: {type(self.base).__name__} does not support activation "
                            "checkpointing in transformers; train without it")
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant"):
            logger.warning("use_reentrant=True cannot carry prefix gradients through keyword arguments; using False")
        kwargs["use_reentrant"] = False
        self.base.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        for module in self.base.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._can_checkpoint_with_cache = True
            elif getattr(module, "gradient_checkpointing", False):
                # Model-level flags only serve to drop the cache (GPT-2 does); the layers still checkpoint.
                module.gradient_checkpointing = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        self.base.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.base.modules()
                   if isinstance(m, GradientCheckpointingLayer))


class PrefixTunedModel(PrefixModelBase):
    """A frozen causal LM whose every attention layer sees ``pre_seq_len`` trainable keys/values first.

    ``forward`` with ``labels`` returns the loss computed only on target positions (the logits returned then cover
    only those columns); without labels it returns the full logits. ``generate`` seeds a normal growing cache with
    the prefix, repeated per beam / returned sequence.
    """

    def __init__(self, base: nn.Module, prefix_config: PrefixConfig):
        check_architecture(base.config, base)
        super().__init__(base, prefix_config)
        # Rows (target tokens) per chunk of the training loss: None picks ~LOSS_CHUNK_BYTES of fp32 logits per chunk;
        # 0 switches chunking off (the LM head on the batch's target columns, fp32 log-probs of all of them at once).
        self.loss_chunk_rows: int | None = None
        # Whether the logits are the LM head's plain output (the chunked loss relies on it): one small forward, here
        # rather than inside the first training step
        self._plain_head = logits_are_plain_head(base) if self._usable_lm_head() is not None else None

    @property
    def generation_config(self):
        return self.base.generation_config

    def _prefixed_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """Mask with ``pre_seq_len`` leading ones, and positions counted from the mask so left padding is harmless."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        p = self.prefix_config.pre_seq_len
        ones = attention_mask.new_ones(attention_mask.shape[0], p)
        full_mask = torch.cat([ones, attention_mask], dim=1)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.prefix_config.position_offset:
            position_ids = position_ids + p
        return full_mask, position_ids

    def forward(self, input_ids, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        full_mask, position_ids = self._prefixed_inputs(input_ids, attention_mask)
        key_values = self.prefix_encoder.key_values(input_ids.shape[0], _activation_dtype(self.base))
        model_kwargs = dict(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=position_ids,
            past_key_values=read_only_cache(key_values),
            use_cache=False,
        )
        if labels is None:
            out = self.base(**model_kwargs)
            return CausalLMOutputWithPast(logits=out.logits)
        shifted = labels[:, 1:]
        head = self._chunkable_lm_head()
        if head is not None:
            # Training: the decoder's hidden states at the target positions only (row by row, no padding columns),
            # then LM head + fp32 cross-entropy chunk by chunk; no logits are returned.
            hidden = self.base.base_model(**model_kwargs).last_hidden_state[:, :-1]
            select = (shifted != -100).to(hidden.device)
            loss = chunked_target_loss(hidden[select], head.weight, shifted.to(hidden.device)[select],
                                       num_items_in_batch, self.loss_chunk_rows)
            return CausalLMOutputWithPast(loss=loss)
        keep = (shifted != -100).any(dim=0).nonzero().squeeze(-1)
        out = self.base(**model_kwargs, logits_to_keep=keep)
        loss = target_loss(out.logits, shifted[:, keep], num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits)

    def _chunkable_lm_head(self):
        """The LM head when the chunked loss can use its weight directly (training, a plain frozen bias-free Linear
        whose full weight is on this process, and logits that are its plain output); else None."""
        if self.loss_chunk_rows == 0 or not torch.is_grad_enabled():
            return None
        head = self._usable_lm_head()
        if head is None:
            return None
        if self._plain_head is None:
            self._plain_head = logits_are_plain_head(self.base)
        return head if self._plain_head else None

    def _usable_lm_head(self):
        head = self.base.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None:
            return None
        weight = head.weight
        if weight.requires_grad or weight.dim() != 2 or weight.shape[0] != head.out_features or \
                weight.device.type == "meta" or hasattr(weight, "ds_id") or type(weight) is not nn.Parameter:
            return None  # trained, ZeRO-3-partitioned, offloaded or quantized heads take the logits_to_keep path
        if weight.device != self.base.get_input_embeddings().weight.device:
            return None  # split across devices: the head module's own hooks move its inputs
        return head

    @contextlib.contextmanager
    def prefix_disabled(self):
        """``generate()`` runs the bare base model inside, to show what it did before the prefix was trained."""
        self._prefix_off = True
        try:
            yield self
        finally:
            self._prefix_off = False

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        if getattr(self, "_prefix_off", False):
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        gen_cfg = kwargs.get("generation_config") or self.base.generation_config
        beams = kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1
        returns = kwargs.get("num_return_sequences", getattr(gen_cfg, "num_return_sequences", 1)) or 1
        key_values = self.prefix_encoder.key_values(
            input_ids.shape[0], _activation_dtype(self.base), repeats=max(beams, returns)
        )
        full_mask, position_ids = self._prefixed_inputs(input_ids, attention_mask)
        if not self.prefix_config.position_offset:
            kwargs["position_ids"] = position_ids
        return self.base.generate(
            input_ids=input_ids,
            attention_mask=full_mask,
            past_key_values=generation_cache(key_values, self.base.config),
            **kwargs,
        )


@torch.no_grad()
def logits_are_plain_head(base) -> bool:
    """Whether ``base``'s logits are exactly its LM head applied to its decoder output, which the chunked loss
    assumes. Found by running two tokens both ways: Gemma 2's final soft-capping, Cohere's ``logit_scale`` and
    Granite's ``logits_scaling`` make them differ, and those models take the ``logits_to_keep`` path.

    Both runs are in train mode (in eval mode bitsandbytes repacks a CPU 4-bit weight for inference, which not every
    shape allows) and draw the same dropout masks from the same forked RNG state."""
    device = base.get_input_embeddings().weight.device
    ids = torch.full((1, 2), min(3, base.config.get_text_config().vocab_size - 1), dtype=torch.long, device=device)
    cuda = [device] if device.type == "cuda" else []
    was_training = base.training
    base.train()
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            logits = base(input_ids=ids, use_cache=False).logits.float()
            torch.manual_seed(0)
            hidden = base.base_model(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        base.train(was_training)
    plain = F.linear(hidden, base.get_output_embeddings().weight).float()
    return logits.shape == plain.shape and bool(torch.allclose(logits, plain, rtol=1e-4, atol=1e-4))


LOSS_CHUNK_BYTES = 32 * 2**20


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, ``rows`` at a time.

    Each chunk's fp32 logits live only inside its loop iteration: the gradient with respect to ``hidden``
    (softmax minus one-hot, times the frozen ``weight``) is computed right there, so backward has nothing to recompute
    and the ``[tokens, vocab]`` logits never exist in full. ``weight`` gets no gradient (the base is frozen).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            t = targets[start:start + rows]
            logits = F.linear(h, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1
                torch.matmul(probs.to(h.dtype), weight, out=grad[start:start + rows])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def chunked_target_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None,
                        rows: int | None = None) -> torch.Tensor:
    """``target_loss(hidden @ weight.T, targets)`` for ``hidden`` ``[tokens, hidden]`` rows that all carry a target,
    with at most ``rows`` tokens' fp32 logits alive at once (default: about ``LOSS_CHUNK_BYTES`` of them)."""
    if not rows:
        rows = max(1, LOSS_CHUNK_BYTES // (4 * weight.shape[0]))
    total = _LinearCrossEntropy.apply(hidden, weight, targets, rows)
    if num_items_in_batch is None:
        return total / targets.shape[0]
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def target_loss(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Token-level cross-entropy in fp32; summed and divided by ``num_items_in_batch`` under gradient accumulation."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1).to(flat_logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def new_prefix_config(model, pre_seq_len: int, prefix_projection: bool, prefix_hidden_size: int,
                      prefix_dropout: float, position_offset: bool, **fields) -> PrefixConfig:
    """A fresh prefix's config sized from ``model.config``; ``fields`` add what only one kind of wrapper records."""
    if pre_seq_len <= 0:
        raise UserError(f"--pre_seq_len: expected a positive integer, got {pre_seq_len}")
    return PrefixConfig(
        pre_seq_len=pre_seq_len,
        prefix_projection=prefix_projection,
        prefix_hidden_size=prefix_hidden_size,
        prefix_dropout=prefix_dropout,
        position_offset=position_offset,
        base_model_name_or_path=getattr(model.config, "_name_or_path", "") or "",
        **fields,
        **model_geometry(model),
    )


def attach_prefix(model, pre_seq_len: int, prefix_projection: bool = False, prefix_hidden_size: int = 512,
                  prefix_dropout: float = 0.0, position_offset: bool = True) -> PrefixTunedModel:
    """Freeze ``model`` and wrap it with a fresh prefix sized from its config."""
    config = new_prefix_config(model, pre_seq_len, prefix_projection, prefix_hidden_size, prefix_dropout,
                               position_offset, base_architecture=check_architecture(model.config, model))
    return PrefixTunedModel(model, config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
