"""Peak GPU memory of a P-Tuning v2 training step, predicted from the model config alone (no weights are loaded).

    python main.py plan --model_name_or_path DIR_OR_CONFIG_JSON --quantization_bit 4 --torch_dtype bf16 \\
        --per_device_train_batch_size 1 --max_source_length 64 --max_target_length 64 --pre_seq_len 128 \\
        --activation_checkpointing --gpu_memory 8GB
    python main.py plan <the flags of the training command you were about to run>     # a dry run of it

Symbols: b batch per device; s = max_source_length + max_target_length tokens per row; p = pre_seq_len; k = p + s
keys per query; N target tokens the chunked loss sees: only real targets, selected row by row, b × max_target_length
(``--loss_columns`` per row overrides, e.g. for multi-turn rows that train several replies); T loss columns per row
of the ``logits_to_keep`` path: max_target_length, or with b > 1 the worst case s - 1 (rows whose prompts differ in
length put their targets in different columns, and that path keeps their union; ``--loss_columns`` overrides); L
layers; h hidden size; H query heads; g key/value heads; d head dim; r rotary dims; f MLP width; V vocabulary; c
bytes of the compute dtype (2 for bf16/fp16, 4 for fp32), which every unquantized weight also has; P trainable
prefix parameters (p × 2Lgd, or the reparameterisation MLP's).

The terms of ``MemoryPlan.terms``; their sum is the peak:

weights: linears        q/k/v/o and the MLP projections of every layer, numel × c, or as bitsandbytes stores them:
                          INT8  numel + 4 × out_features     (int8 rows and one fp32 scale per row: LLM.int8)
                          INT4  numel / 2 + 4 × numel / 64   (two 4-bit codes a byte, one fp32 absmax per 64
                                weights); --double_quant stores the absmax in 8 bits: numel / 64 + 4 × numel / 16384
weights: embeddings...  embeddings V h and the LM head V h (unless tied; bitsandbytes never quantizes it), norms,
                        biases, all in c (and RoPE's fp32 inverse frequencies). For a 6B GLM that is 1 GB, a
                        quarter of an INT4 model.
prefix state            4 P fp32 parameters + 8 P AdamW moments (ZeRO-1+ divides the moments by the world size,
                        ZeRO-3 the parameters too). The 4 P gradient appears only at the end of backward, when the
                        activations are gone. An 8-bit or paged optimizer could save at most 6 of these 12 bytes
                        per parameter: megabytes for a prefix, so there is none here.
activations             what autograd keeps between forward and backward. The base is frozen, so no linear keeps its
                        input for a weight gradient; what stays is, per layer:
                          attention  b s k c (the boolean mask as the float bias SDPA makes of it on each call)
                                     + b H s d c (queries) + 2 b H k d c (keys and values with the prefix in front,
                                     repeated to H heads for GQA) + b H s d c (output) + 4 b H s (logsumexp); no
                                     [b, H, s, k] scores: SDPA runs a fused kernel (memory-efficient/flash/cuDNN on
                                     GPU, flash on CPU)
                          norms      4 b s h + 4 b s per RMSNorm (its input upcast to fp32, and 1/rms): two per layer,
                                     four for GLM-4, and Qwen3's per-head q/k norms 4 b s (H + g)(d + 1)
                          MLP        3 b s f c (gate, up, act(gate)); GPT-2's python GELU 4 b s f c
                          INT8 only  bitsandbytes' int8 matmul keeps its input as a plain attribute of its autograd
                                     context, which neither a frozen weight nor checkpointing releases:
                                     (2 h + f) b s c, and under checkpointing also the o input, b s H d c
                        and once: RoPE cos/sin 2 b s r c. Layer 0's input norm keeps nothing (nothing before it
                        needs a gradient).
                        With gradient checkpointing only each layer's input stays, L b s h c, with what the
                        recomputation needs: the boolean mask b s k and the prefix keys/values cast to c, b p 2Lgd c
                        (in fp32 they are views of the parameter).
transient               the largest of three moments on top of the kept activations:
                          loss            training's chunked loss (``ptuning.model.chunked_target_loss``), at the
                                          end of the forward: the final norm's saved tensors (4 b s h + 4 b s), the
                                          decoder output b s h c, the hidden states at the N target positions and
                                          the gradient with respect to them, computed in the loop and saved for
                                          backward, 2 N h c, and one chunk of rows = min(N, max(1, 32 MiB // 4 V))
                                          tokens (``LOSS_CHUNK_BYTES``): its fp32 logits and logsumexp's fp32
                                          temporary, 8 rows V (the LM head's c output, the log-probs turned into
                                          probabilities in place and their cast to c for the gradient matmul never
                                          coexist with more than that); plus the prefix keys/values cast to c
                                          (b p 2Lgd c, unless checkpointing already counts them, or fp32) and the
                                          int64 mask and positions 8 b (k + s). No [N, V] logits ever exist.
                                          Under ZeRO-3 (a partitioned LM head), or with chunking off
                                          (``loss_chunk_rows = 0``, ``Setup.loss_chunk_rows``), the loss takes the
                                          ``logits_to_keep`` path instead, at the start of backward: the final
                                          norm plus 12 b T V, the fp32 log-probabilities and the fp32 gradients of
                                          them and of the logits of the T target columns. A 4/8-bit base takes the
                                          chunked path: bitsandbytes never quantizes the LM head.
                          final norm      the final RMSNorm's backward, the first step after the loss's: its saved
                          backward        tensors and ~20 b s h of fp32 gradients and temporaries, with no layer's
                                          activations freed yet. It sets the peak in bf16/fp16 without
                                          checkpointing when the chunk is small next to b s h (GPT-2's fused
                                          LayerNorm backward did not in any measured case: not modelled).
                          layer backward  the gradient arriving from above (b s h c), the prefix gradient gathered
                                          so far (b p 2Lgd c), with checkpointing the layer's recomputed
                                          activations, and the widest of: the MLP's gradients 3 b s f c; the
                                          attention's (output, queries, keys, values); a quantized linear's
                                          backward, which multiplies by its weight dequantized to c (the biggest
                                          linear: 224 MB for a 6B GLM's gate_up) plus ~2 b s f c; an RMSNorm's
                                          backward, ~20 b s h in fp32 (in Llama-like layers reached after the
                                          MLP's backward freed its 3 b s f c; GLM-4's post-MLP norm comes first).
ZeRO-3                  weights / world size + two gathered layers (current and prefetched); not measured here.
DeepSpeed buffers       ZeRO-2/3 gradient buckets, 2 h² c; not measured here.

The peak is what ``torch.cuda.max_memory_allocated()`` reports. A card needs more: the CUDA context and kernel
images live outside PyTorch's allocator (``CUDA_CONTEXT``, about 0.5 GiB with recent drivers and lazy module
loading), and the caching allocator rounds and fragments (``FRAGMENTATION`` of the activations and transients).
``needed`` adds both; the verdict compares it with ``--gpu_memory`` (8GB there means 8 GiB, as on spec sheets).

How this was checked (``measure_step``):
  CPU, in the tests   the state before the step is every distinct storage reachable from the model and the
                      optimizer (parameters, buffers, bitsandbytes' quantization state, AdamW moments); the step
                      itself runs under ``torch.profiler`` with ``profile_memory=True``, which records every
                      allocation and free of PyTorch's CPU allocator in order, so the running sum's maximum is the
                      step's exact peak above that state: no sampling, no RSS noise, and allocations made inside
                      bitsandbytes' kernels count too. Across Llama, Qwen2/3, Mistral, GLM, GLM-4 and GPT-2 tiny
                      models, fp32/bf16, INT4/INT8, checkpointing on and off, with the default loss chunks and with
                      several chunks per step (``Setup.loss_chunk_rows``), and the unchunked path, the plan is within
                      3 % of it, and the weights term is exact to the byte.
  GPU, bench/memory.py  ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``. The CUDA paths
                      differ from the CPU ones in ways the terms above already follow (fused SDPA kernels, the
                      int8 matmul keeping its input, dequantized weights in backward); cuBLAS workspaces (tens of
                      MB) are not modelled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

from .errors import UserError, model_source_error

KiB, MiB, GiB = 1024, 1024**2, 1024**3
CUDA_CONTEXT = 0.5 * GiB
FRAGMENTATION = 0.10
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
INT4_BLOCK = 64            # bitsandbytes 4-bit blocksize: one absmax per 64 weights
INT4_NESTED_BLOCK = 256    # double quantization: one fp32 absmax per 256 8-bit absmaxes
NESTED_CODE_BYTES = 256 * 4 + 4   # the 8-bit absmax codebook and offset, per linear
INT4_CODE_BYTES = 16 * 4   # the 4-bit codebook, per linear


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Geometry:
    """The shapes that decide memory, read from a transformers config."""

    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied_embeddings: bool = False
    gated_mlp: bool = True          # Llama/Qwen/Mistral/GLM: gate and up projections; GPT-2: one GELU projection
    norms_per_layer: int = 2        # GLM-4 adds two post-norms
    qk_norm: bool = False           # Qwen3
    qkv_bias: bool = False
    rotary_dim: int = 0             # 0: learned absolute positions (GPT-2)
    positions: int = 0              # learned position embeddings (GPT-2)
    value_head_dim: int = 0         # width of one cached value head when it differs from head_dim (MLA); 0: same
    # Families without a hand-written layer model (see ``HAND_MODELLED``): the (out, in) shape of every nn.Linear of
    # the model except the LM head (what bitsandbytes quantizes), and the number of all other parameter elements
    # (embeddings, LM head, norms, biases, and MoE experts stored as 3-D tensors, which bitsandbytes leaves in the
    # compute dtype), counted on the model built on the meta device.
    model_linears: tuple = ()
    other_params: int = -1
    buffer_bytes: int = 0           # counted families: buffers of a fixed dtype (fp32 RoPE frequencies, ...)
    fp32_params: int = 0            # counted families: parameters the model keeps in fp32 (_keep_in_fp32_modules)

    @classmethod
    def from_config(cls, config) -> "Geometry":
        """The shapes of ``config``'s model. Key/value heads and widths are what the attention caches
        (``ptuning.capability``, which also refuses models a prefix cannot reach); the seven hand-modelled families
        keep their exact per-layer formulas, every other family counts its weights on a meta-device copy."""
        from .capability import check_model
        from .prefix import model_geometry

        arch = check_model(config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        g = model_geometry(config)
        gpt2 = arch == "GPT2LMHeadModel"
        if gpt2:
            ffn = getattr(text, "n_inner", None) or 4 * g["hidden_size"]
        else:
            ffn = _active_ffn(text)
        rope = getattr(text, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0)) or 1.0
        generic = {} if arch in HAND_MODELLED else _counted_weights(config)
        heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None) or g["num_kv_heads"]
        return cls(
            architecture=arch,
            layers=g["num_layers"],
            hidden=g["hidden_size"],
            heads=heads,
            kv_heads=g["num_kv_heads"],
            head_dim=g["head_dim"],
            ffn=int(ffn),
            vocab=g["vocab_size"],
            tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
            gated_mlp=not gpt2,
            norms_per_layer=4 if arch == "Glm4ForCausalLM" else 2,
            qk_norm=arch == "Qwen3ForCausalLM",
            qkv_bias=gpt2 or bool(getattr(text, "attention_bias", False)) or arch == "Qwen2ForCausalLM",
            rotary_dim=0 if gpt2 else int(g["head_dim"] * factor),
            positions=getattr(text, "n_positions", 0) if gpt2 else 0,
            value_head_dim=g["value_head_dim"] if g["value_head_dim"] != g["head_dim"] else 0,
            **generic,
        )

    def linears(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of every quantizable linear in one layer; for counted families
        (``model_linears``) those of the whole model."""
        if self.model_linears:
            return list(self.model_linears)
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if not self.gated_mlp:  # GPT-2: fused c_attn, c_proj, c_fc, mlp.c_proj
            return [(q + 2 * kv, h), (h, q), (self.ffn, h), (h, self.ffn)]
        if self.architecture in ("GlmForCausalLM", "Glm4ForCausalLM"):  # fused gate_up_proj
            mlp = [(2 * self.ffn, h), (h, self.ffn)]
        else:
            mlp = [(self.ffn, h), (self.ffn, h), (h, self.ffn)]
        return [(q, h), (kv, h), (kv, h), (h, q)] + mlp

    @property
    def prefix_width(self) -> int:
        return self.layers * self.kv_heads * (self.head_dim + (self.value_head_dim or self.head_dim))


# Families whose layers the activation and weight terms model exactly (checked against measured peaks)
HAND_MODELLED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "GlmForCausalLM",
                 "Glm4ForCausalLM", "GPT2LMHeadModel")


def _active_ffn(text) -> int:
    """MLP width one token goes through: the dense intermediate size, or for MoE layers the routed experts' widths
    times experts per token plus any shared expert (an estimate of activations, not measured)."""
    experts_per_token = getattr(text, "num_experts_per_tok", None) or getattr(text, "moe_k", None)
    expert_width = getattr(text, "moe_intermediate_size", None)
    if experts_per_token and expert_width:
        shared = (getattr(text, "shared_expert_intermediate_size", None)
                  or (getattr(text, "n_shared_experts", None) or 0) * expert_width)
        return int(experts_per_token * expert_width + shared)
    return int(getattr(text, "intermediate_size", None) or getattr(text, "ffn_hidden_size", None)
               or 4 * (getattr(text, "hidden_size", None) or 0))


def _counted_weights(config) -> dict:
    """``model_linears`` and ``other_params`` counted on the model built on the meta device."""
    from torch import nn

    from .capability import _meta_copy

    import torch

    # built in bf16, as a 16-bit run loads it: what stays fp32 (router biases, RoPE frequencies) shows as fp32
    model = _meta_copy(config, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    linears, in_linears = [], set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            linears.append((module.out_features, module.in_features))
            in_linears.add(id(module.weight))
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | \
        set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    seen, other, fp32 = set(), 0, 0
    for name, p in model.named_parameters():  # tied weights are one parameter
        if id(p) not in seen and id(p) not in in_linears:
            if keep_fp32 & set(name.split(".")) or p.dtype == torch.float32:
                fp32 += p.numel()
            else:
                other += p.numel()
        seen.add(id(p))
    buffers = 0
    for name, b in model.named_buffers():
        if keep_fp32 & set(name.split(".")):
            buffers += 4 * b.numel()
        elif b.dtype == torch.bfloat16:  # follows the compute dtype
            other += b.numel()
        else:
            buffers += b.numel() * b.element_size()
    return dict(model_linears=tuple(linears), other_params=other, fp32_params=fp32, buffer_bytes=buffers)


@dataclass(frozen=True)
class Setup:
    """What the run does: everything except the model's shapes."""

    dtype: str = "bf16"
    quantization_bit: int | None = None
    quant_type: str = "nf4"
    double_quant: bool = False
    batch: int = 1
    source_len: int = 64
    target_len: int = 64
    loss_columns: int | None = None   # None: target_len for batch 1, the worst case s - 1 for larger batches
    loss_chunk_rows: int | None = None  # as PrefixTunedModel.loss_chunk_rows: None ~LOSS_CHUNK_BYTES of logits a
                                        # chunk, 0 the logits_to_keep path
    pre_seq_len: int = 128
    prefix_projection: bool = False
    prefix_hidden_size: int = 512
    gradient_checkpointing: bool = True
    zero_stage: int = 0
    world_size: int = 1
    device: str = "cuda"              # "cpu" only to compare with CPU measurements (see ``dequantized``)

    @property
    def seq_len(self) -> int:
        return self.source_len + self.target_len

    @property
    def columns(self) -> int:
        if self.loss_columns is not None:
            return self.loss_columns
        return self.target_len if self.batch == 1 else self.seq_len - 1

    @property
    def chunked_loss(self) -> bool:
        """Whether training takes the chunked loss (``PrefixTunedModel._chunkable_lm_head``): always, except under
        ZeRO-3 (a partitioned LM head) or with chunking switched off. bitsandbytes never quantizes the LM head, so a
        4/8-bit base takes it too."""
        return self.loss_chunk_rows != 0 and self.zero_stage != 3

    @property
    def target_tokens(self) -> int:
        """N, the tokens the chunked loss sees: only real targets, b × max_target_length (``loss_columns`` per row
        when given, e.g. for multi-turn rows that train several replies)."""
        return self.batch * (self.loss_columns if self.loss_columns is not None else self.target_len)

    def loss_rows(self, vocab: int) -> int:
        """Target tokens per chunk of the chunked loss, as ``ptuning.model.chunked_target_loss`` picks them."""
        if self.loss_chunk_rows:
            rows = self.loss_chunk_rows
        else:
            from .model import LOSS_CHUNK_BYTES

            rows = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
        return max(1, min(rows, self.target_tokens))


# ---------------------------------------------------------------------------------------------------- the model


@dataclass
class MemoryPlan:
    """The predicted peak of one training step, term by term (the module docstring explains each)."""

    geometry: Geometry
    setup: Setup
    terms: dict[str, int] = field(default_factory=dict)  # name → bytes; their sum is the peak
    phase: str = ""             # which moment sets the peak: "loss", "final norm backward" or "layer backward"

    @property
    def peak(self) -> int:
        return sum(self.terms.values())

    @property
    def needed(self) -> int:
        """What the card must have free: the peak plus the CUDA context and the allocator's slack."""
        dynamic = self.terms.get("activations", 0) + self.terms.get("transient", 0)
        return int(self.peak + CUDA_CONTEXT + FRAGMENTATION * dynamic)


def quantized_linear_bytes(out_features: int, in_features: int, bits: int | None, weight_bytes: int,
                           double_quant: bool = False) -> int:
    """Bytes of one linear's weight as bitsandbytes stores it."""
    n = out_features * in_features
    if not bits:
        return n * weight_bytes
    if bits == 8:
        return n + out_features * 4
    blocks = math.ceil(n / INT4_BLOCK)
    if double_quant:
        absmax = blocks + math.ceil(blocks / INT4_NESTED_BLOCK) * 4 + NESTED_CODE_BYTES
    else:
        absmax = blocks * 4
    return math.ceil(n / 2) + absmax + INT4_CODE_BYTES


def prefix_parameters(geo: Geometry, setup: Setup) -> int:
    p, width = setup.pre_seq_len, geo.prefix_width
    if not setup.prefix_projection:
        return p * width
    ph = setup.prefix_hidden_size
    return p * geo.hidden + geo.hidden * ph + ph + ph * width + width


def weight_bytes(geo: Geometry, setup: Setup) -> tuple[int, int]:
    """(quantized linears, everything else) in bytes."""
    c = DTYPE_BYTES[setup.dtype]
    linears = (1 if geo.model_linears else geo.layers) * sum(
        quantized_linear_bytes(o, i, setup.quantization_bit, c, setup.double_quant) for o, i in geo.linears())
    if geo.other_params >= 0:
        return linears, geo.other_params * c + geo.fp32_params * 4 + geo.buffer_bytes
    h = geo.hidden
    other = geo.vocab * h * (1 if geo.tied_embeddings else 2) + geo.positions * h
    norm = h if geo.gated_mlp else 2 * h  # LayerNorm has a bias
    other += (geo.layers * geo.norms_per_layer + 1) * norm
    if geo.qk_norm:
        other += geo.layers * 2 * geo.head_dim
    if geo.qkv_bias:
        other += geo.layers * (geo.heads + 2 * geo.kv_heads) * geo.head_dim
    if not geo.gated_mlp:  # GPT-2's c_proj, c_fc and mlp.c_proj biases
        other += geo.layers * (2 * h + geo.ffn)
    rope = 4 * geo.rotary_dim  # RoPE's inv_freq and its original copy, r / 2 fp32 values each
    return linears, other * c + rope


def _layer_activations(geo: Geometry, setup: Setup) -> int:
    """Bytes one layer keeps for backward, its norms included; not the INT8 inputs."""
    c = DTYPE_BYTES[setup.dtype]
    b, s, k = setup.batch, setup.seq_len, setup.pre_seq_len + setup.seq_len
    H, g, d, f = geo.heads, geo.kv_heads, geo.head_dim, geo.ffn
    # GPT-2's queries are a view of its fused q/k/v projection, so SDPA keeps all of that output alive
    queries = b * s * (H + 2 * g) * d * c if not geo.gated_mlp else b * H * s * d * c
    attention = b * s * k * c + queries + 2 * b * H * k * d * c + b * H * s * d * c + 4 * b * H * s
    norms = geo.norms_per_layer * _norm(geo, setup) + _qk_norms(geo, setup)
    mlp = (3 if geo.gated_mlp else 4) * b * s * f * c
    return attention + norms + mlp


def _norm(geo: Geometry, setup: Setup) -> int:
    """An RMSNorm keeps its input upcast to fp32 and 1/rms per token; GPT-2's LayerNorm its input, mean and 1/std."""
    b, s = setup.batch, setup.seq_len
    if not geo.gated_mlp:
        return b * s * geo.hidden * DTYPE_BYTES[setup.dtype] + 8 * b * s
    return 4 * b * s * geo.hidden + 4 * b * s


def _qk_norms(geo: Geometry, setup: Setup) -> int:
    """Qwen3 normalises each query and key head (fp32 input and 1/rms kept)."""
    if not geo.qk_norm:
        return 0
    return 4 * setup.batch * setup.seq_len * (geo.heads + geo.kv_heads) * (geo.head_dim + 1)


def _int8_inputs(geo: Geometry, setup: Setup) -> int:
    """bitsandbytes' INT8 matmul keeps its input as a Python attribute of its autograd context, so neither a frozen
    weight nor gradient checkpointing releases it. Per layer: the q/k/v input, the MLP input, the down input, and
    under checkpointing the o input too (without it, that one is SDPA's saved output anyway)."""
    if setup.quantization_bit != 8:
        return 0
    width = 2 * geo.hidden + geo.ffn + (geo.heads * geo.head_dim if setup.gradient_checkpointing else 0)
    return width * setup.batch * setup.seq_len * DTYPE_BYTES[setup.dtype]


def _layer_backward(geo: Geometry, setup: Setup, dequant: int) -> int:
    """Bytes alive while one layer is differentiated, beyond what it kept: the gradient arriving from above
    (b s h c) plus the widest of
      the MLP's gradients: the incoming one and the two of the gated product, 3 b s f c;
      the attention's: output, queries, keys and values;
      a quantized linear's backward: its weight dequantized to c, with the gradients on both sides, ~2 b s f c;
      an RMSNorm's backward: about five fp32 [b, s, h] tensors, 20 b s h; in Llama-like layers the first norm is
        reached after the MLP's backward has freed what the MLP kept (3 b s f c), while GLM-4's post-MLP norm is
        differentiated first, with everything still there."""
    c = DTYPE_BYTES[setup.dtype]
    b, s, k = setup.batch, setup.seq_len, setup.pre_seq_len + setup.seq_len
    H, d, h, f = geo.heads, geo.head_dim, geo.hidden, geo.ffn
    mlp = 3 * b * s * f * c
    attention = (2 * b * H * s * d + 2 * b * H * k * d) * c + 4 * b * H * s
    linear = dequant + 2 * b * s * f * c if dequant else 0
    norm = 20 * b * s * h - (mlp if geo.norms_per_layer <= 2 else 0) if geo.gated_mlp else 0
    return b * s * h * c + max(mlp, attention, linear, norm)


def plan(config_or_geometry, setup: Setup) -> MemoryPlan:
    """The expected peak of one training step (see the module docstring for every term)."""
    geo = config_or_geometry if isinstance(config_or_geometry, Geometry) else Geometry.from_config(config_or_geometry)
    if setup.dtype not in DTYPE_BYTES:
        raise UserError(f"memory plan: dtype {setup.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    if setup.quantization_bit not in (None, 0, 4, 8):
        raise UserError(f"--quantization_bit: expected 4 or 8, got {setup.quantization_bit}")
    check_quantization_zero(setup.quantization_bit, setup.zero_stage)
    c = DTYPE_BYTES[setup.dtype]
    b, s, p, L = setup.batch, setup.seq_len, setup.pre_seq_len, geo.layers
    world = max(1, setup.world_size)
    result = MemoryPlan(geo, setup)

    linears, other = weight_bytes(geo, setup)
    if setup.zero_stage == 3:
        layer = sum(o * i for o, i in geo.linears()) * c // (geo.layers if geo.model_linears else 1)
        gathered = 2 * max(layer, geo.vocab * geo.hidden * c)
        result.terms["weights (ZeRO-3 shard + 2 gathered layers)"] = (linears + other) // world + gathered
    else:
        result.terms["weights: linears"] = linears
        # counted families: also MoE experts kept as 3-D tensors, which bitsandbytes does not quantize
        other_name = "weights: embeddings, LM head, norms" + (", experts" if geo.other_params >= 0 else "")
        result.terms[other_name] = other

    P = prefix_parameters(geo, setup)
    stage = setup.zero_stage
    # parameters and AdamW moments; the gradient only appears at the end of backward, when the activations are gone
    state = 4 * P // (world if stage == 3 else 1) + 8 * P // (world if stage >= 1 else 1)
    result.terms["prefix state"] = state
    if stage >= 2:
        result.terms["DeepSpeed buffers"] = 2 * geo.hidden * geo.hidden * c

    # Kept between forward and backward, at both candidate peak moments.
    kv = b * p * geo.prefix_width * c  # the prefix keys/values of every layer, cast to the compute dtype
    kept = 2 * b * s * geo.rotary_dim * c + L * _int8_inputs(geo, setup)
    if setup.prefix_projection:
        kept += 4 * p * (setup.prefix_hidden_size + geo.prefix_width)
    layer = _layer_activations(geo, setup)
    if setup.gradient_checkpointing:
        # each layer's input, the boolean mask and (unless fp32, where they are views of the parameter) the prefix
        # keys/values: the recomputation needs them
        kept += L * b * s * geo.hidden * c + b * s * (p + s) + (kv if c != 4 else 0)
        # in fp32 the input norm keeps the layer input itself, which is counted above
        recomputed = layer - (4 * b * s * geo.hidden if c == 4 else 0)
    else:
        # layer 0's input norm (and Qwen3's q/k norms) see no gradient: nothing before them requires one
        kept += L * layer - _norm(geo, setup) - _qk_norms(geo, setup)
        recomputed = 0
    result.terms["activations"] = kept

    # The candidate peaks: the loss, the final norm's backward (with every activation still kept), a layer's backward.
    candidates = {
        "loss": _loss(geo, setup, kv),
        "final norm backward": _final_norm_backward(geo, setup),
        "layer backward": recomputed + _layer_backward(geo, setup, dequantized(geo, setup)) + kv,
    }
    result.phase = max(candidates, key=candidates.get)  # the first of equals: the loss
    result.terms["transient"] = candidates[result.phase]
    return result


def _loss(geo: Geometry, setup: Setup, kv: int) -> int:
    """Bytes alive at the loss beyond the kept activations (the module docstring's "loss" term).

    Chunked (training's path): at the end of the forward, inside ``_LinearCrossEntropy``'s loop: the final norm's
    saved fp32 input and 1/rms, the decoder output b s h c, the N hidden states at the target positions and their
    gradient 2 N h c, one chunk's fp32 logits and logsumexp's fp32 exp temporary 8 rows V, the prefix keys/values
    cast to c (under checkpointing, or in fp32, already counted), and the int64 attention mask and positions.
    logits_to_keep (ZeRO-3, or chunking off): at the start of backward, the final norm's saved tensors and 12 b T V
    (fp32 log-probs and the fp32 gradients of them and of the logits)."""
    c = DTYPE_BYTES[setup.dtype]
    b, s, p, h, V = setup.batch, setup.seq_len, setup.pre_seq_len, geo.hidden, geo.vocab
    if not setup.chunked_loss:
        return _norm(geo, setup) + 12 * b * setup.columns * V
    N = setup.target_tokens
    prefix = kv if c != 4 and not setup.gradient_checkpointing else 0
    return (_norm(geo, setup) + b * s * h * c + 2 * N * h * c + 8 * setup.loss_rows(V) * V + prefix
            + 8 * b * (p + 2 * s))


def _final_norm_backward(geo: Geometry, setup: Setup) -> int:
    """The final RMSNorm's backward, the first thing backward meets after the loss: its saved fp32 input and 1/rms
    and about five fp32 [b, s, h] gradients and temporaries, 20 b s h, while no layer has freed anything yet. Without
    checkpointing, in bf16/fp16 Llama-like models this can exceed both the chunked loss and a layer's backward (whose
    norms are reached after the MLP's backward freed 3 b s f c). GPT-2's fused LayerNorm backward did not set the
    peak in any measured case."""
    if not geo.gated_mlp:
        return 0
    return _norm(geo, setup) + 20 * setup.batch * setup.seq_len * geo.hidden


def dequantized(geo: Geometry, setup: Setup) -> int:
    """Bytes of the biggest linear's weight dequantized to c for a 4/8-bit matmul's backward (0 unquantized).

    On CPU only, INT8's ``CB.to(bf16).mul_(fp32 row scales)`` also makes two fp32 temporaries of the weight
    (CPU elementwise kernels cast mixed dtypes through temporaries; CUDA kernels cast on the fly)."""
    if not setup.quantization_bit:
        return 0
    c = DTYPE_BYTES[setup.dtype]
    numel = max(o * i for o, i in geo.linears())
    cpu_int8 = 8 * numel if setup.device == "cpu" and setup.quantization_bit == 8 and c != 4 else 0
    return numel * c + cpu_int8


# ---------------------------------------------------------------------------------------------------- ZeRO


def zero_stage(deepspeed) -> int:
    """The ZeRO stage of a --deepspeed value (a JSON file, a JSON string or a dict); 0 without DeepSpeed."""
    if not deepspeed:
        return 0
    config = deepspeed
    if isinstance(deepspeed, str):
        if os.path.isfile(deepspeed):
            try:
                with open(deepspeed, encoding="utf-8") as f:
                    config = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"--deepspeed {deepspeed!r}: not valid JSON ({e.msg} at line {e.lineno})") from None
            except UnicodeDecodeError:
                raise UserError(f"--deepspeed {deepspeed!r}: not valid UTF-8; save the file as UTF-8") from None
        else:
            try:
                config = json.loads(deepspeed)
            except json.JSONDecodeError:
                raise UserError(f"--deepspeed {deepspeed!r}: no such file, and not a JSON object") from None
    where = f" {deepspeed!r}" if isinstance(deepspeed, str) and os.path.isfile(deepspeed) else ""
    if not isinstance(config, dict):
        raise UserError(f"--deepspeed{where}: expected a JSON object, got {type(config).__name__}")
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise UserError(f"--deepspeed{where}: zero_optimization must be a JSON object, got {type(zero).__name__}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3, "0", "1", "2", "3"):
        raise UserError(f"--deepspeed{where}: zero_optimization.stage must be 0-3, got {stage!r}")
    return int(stage)


def check_quantization_zero(quantization_bit, stage: int, source=None) -> None:
    """ZeRO-3 shards every parameter across ranks; bitsandbytes' packed weights cannot be sharded."""
    if quantization_bit and stage == 3:
        where = f" ({source})" if isinstance(source, str) and os.path.isfile(source) else ""
        raise UserError(
            f"--quantization_bit {quantization_bit} cannot be combined with DeepSpeed ZeRO-3{where}: ZeRO-3 shards "
            "parameters across ranks and cannot partition bitsandbytes-quantized weights. Use ZeRO-2 or plain DDP "
            "(each rank then holds its own quantized copy), or drop --quantization_bit to shard a bf16 base"
        )


# ---------------------------------------------------------------------------------------------------- report


def parse_size(text: str) -> int:
    """'8GB', '8 GiB', '7.5G', '8192MB' → bytes; GB and MB mean GiB and MiB, as GPU spec sheets do."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise UserError(f"--gpu_memory: expected a size such as 8GB or 7.5GiB, got {text!r}")
    scale = {"": GiB, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _card(n: int) -> str:
    """'an 8.00 GiB card', 'a 24.00 GiB card' (the article as the number is spoken)."""
    size = _gib(n)
    return f"{'an' if size.startswith(('8', '11', '18', '80')) else 'a'} {size} card"


def describe(result: MemoryPlan, gpu_memory: int | None = None) -> str:
    geo, st = result.geometry, result.setup
    if st.quantization_bit == 8:
        base = f"INT8 (LLM.int8), compute {st.dtype}"
    elif st.quantization_bit == 4:
        base = f"INT4 {st.quant_type}{' + double quant' if st.double_quant else ''}, compute {st.dtype}"
    else:
        base = f"{st.dtype} (not quantized)"
    if st.chunked_loss:
        loss = f"chunked loss on {st.target_tokens // st.batch} target tokens per row"
    else:
        loss = f"loss on {st.columns} columns"
    parallel = f"{st.world_size} GPU{'s' if st.world_size > 1 else ''}"
    if st.zero_stage:
        parallel += f", ZeRO-{st.zero_stage}"
    elif st.world_size > 1:
        parallel += ", DDP"
    lines = [
        f"memory plan for {geo.architecture} ({geo.layers} layers, hidden {geo.hidden}, {geo.heads}/{geo.kv_heads} "
        f"heads × {geo.head_dim}{f' (values {geo.value_head_dim})' if geo.value_head_dim else ''}, ffn {geo.ffn}, "
        f"vocab {geo.vocab}), from the config alone",
        f"  base {base}; batch {st.batch} × {st.seq_len} tokens ({st.source_len} source + "
        f"{st.target_len} target, {loss}), pre_seq_len {st.pre_seq_len}"
        f"{' with projection' if st.prefix_projection else ''}; gradient checkpointing "
        f"{'on' if st.gradient_checkpointing else 'off'}; {parallel}",
    ]
    width = max(len(name) for name in result.terms) + 2
    for name, n in result.terms.items():
        label = f"transient ({result.phase})" if name == "transient" else name
        lines.append(f"  {label:<{width + 16}} {n / MiB:10.1f} MiB")
    lines.append(f"  {'expected peak (torch.cuda.max_memory_allocated)':<{width + 16}} {result.peak / MiB:10.1f} MiB"
                 f"  = {_gib(result.peak)}")
    lines.append(f"  {'needs on the card (+ CUDA context, allocator slack)':<{width + 16}} "
                 f"{result.needed / MiB:10.1f} MiB  = {_gib(result.needed)}")
    if not st.gradient_checkpointing:
        with_gc = plan(geo, dataclasses.replace(st, gradient_checkpointing=True))
        lines.append(f"  with --activation_checkpointing the peak would be {_gib(with_gc.peak)}")
    if gpu_memory:
        spare = gpu_memory - result.needed
        verdict = f"fits ({_gib(spare)} to spare)" if spare >= 0 else f"does NOT fit ({_gib(-spare)} short)"
        lines.append(f"  on {_card(gpu_memory)}: {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI


@dataclass
class PlanArguments:
    gpu_memory: str | None = field(default=None, metadata={"help": "Card size to check the plan against, e.g. 8GB."})
    world_size: int = field(default=1, metadata={"help": "Processes (GPUs) the run will use."})
    loss_columns: int | None = field(
        default=None,
        metadata={"help": "Loss tokens per row: real target tokens for the chunked training loss (default "
                          "max_target_length); under ZeRO-3 the batch's target columns (default: max_target_length "
                          "for batch 1, else the worst case)."},
    )


def run_plan(argv=None) -> MemoryPlan:
    """``main.py plan FLAGS``: print the plan for a training command's flags and return it; never loads weights.

    Every flag of a training run is accepted (so any command becomes a dry run by putting ``plan`` in front of it),
    plus ``--gpu_memory``, ``--world_size`` and ``--loss_columns``.
    """
    from .args import ARGUMENT_CLASSES, parse_namespace

    ns = parse_namespace(argv, ARGUMENT_CLASSES + (PlanArguments,))
    if not ns.model_name_or_path:
        raise UserError("plan: --model_name_or_path is required (a model directory, a config.json or a hub id)")
    config = load_config(ns.model_name_or_path, ns.trust_remote_code)
    stage = zero_stage(ns.deepspeed)
    check_quantization_zero(ns.quantization_bit, stage, ns.deepspeed)
    gc = bool(getattr(ns, "gradient_checkpointing", False) or getattr(ns, "activation_checkpointing", False))
    setup = Setup(
        dtype=resolve_dtype(ns.torch_dtype, config),
        quantization_bit=ns.quantization_bit or None,
        quant_type=ns.quant_type,
        double_quant=ns.double_quant,
        batch=ns.per_device_train_batch_size,
        source_len=ns.max_source_length,
        target_len=ns.max_target_length,
        loss_columns=ns.loss_columns,
        pre_seq_len=ns.pre_seq_len,
        prefix_projection=ns.prefix_projection,
        prefix_hidden_size=ns.prefix_hidden_size,
        gradient_checkpointing=gc,
        zero_stage=stage,
        world_size=ns.world_size,
    )
    result = plan(config, setup)
    gpu_memory = parse_size(ns.gpu_memory) if ns.gpu_memory else None
    print(describe(result, gpu_memory))
    if gpu_memory and result.needed > gpu_memory:  # scripts branch on the exit status
        raise UserError(f"plan: the run needs {_gib(result.needed)} and does not fit on {_card(gpu_memory)}",
                        exit_code=1)
    return result


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """A transformers config from a model directory, a config.json file or a hub id (the config only)."""
    from transformers import AutoConfig

    from . import chatglm

    local = os.path.expanduser(name_or_path)
    if not trust_remote_code and chatglm.is_original_chatglm(local):
        return chatglm.glm_config(local)[0]  # what training converts it to; its remote code is never run
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise model_source_error(name_or_path, e) from None


def resolve_dtype(torch_dtype: str, config) -> str:
    """The compute dtype a run will use: --torch_dtype, or for 'auto' the checkpoint's own (fp32 when unset)."""
    if torch_dtype != "auto":
        if torch_dtype not in DTYPE_BYTES:
            raise UserError(f"--torch_dtype: expected one of auto, {', '.join(sorted(DTYPE_BYTES))}; got {torch_dtype!r}")
        return torch_dtype
    dtype = getattr(config, "dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return name if name in DTYPE_BYTES else "float32"


# ---------------------------------------------------------------------------------------------------- measuring


def state_bytes(*objects) -> int:
    """Bytes of every distinct storage reachable from modules, optimizers and tensors: parameters, buffers,
    bitsandbytes' quantization state (absmax, codebooks, int8 scales) and optimizer moments."""
    import torch

    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st.nbytes())

    def walk(obj, depth=0):
        if depth > 3 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            add(obj)
            for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
                walk(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value, depth + 1)
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value, depth + 1)
        elif type(obj).__module__.startswith("bitsandbytes"):
            for value in vars(obj).values():
                walk(value, depth + 1)

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for module in obj.modules():
                for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                    walk(t)
                walk(getattr(module, "state", None))
        elif isinstance(obj, torch.optim.Optimizer):
            walk(list(obj.state.values()))
        else:
            walk(obj)
    return sum(seen.values())


def measure_step(step, *state, device=None) -> tuple[int, int]:
    """(bytes of the state before the step, peak bytes allocated during ``step()`` above it).

    CUDA: the allocator's own counters. CPU: the ordered allocation/free events torch.profiler records from
    PyTorch's CPU allocator; their running sum's maximum is the peak.
    """
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return before, torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    before = state_bytes(*state)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return before, peak
