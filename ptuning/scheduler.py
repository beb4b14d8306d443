"""Continuous batching over a ``MultiPrefixModel``: requests join and leave the running batch at step boundaries.

One engine thread owns the model. New requests are prefilled with their own prefix as the cache's first slots (as
``MultiPrefixModel.generate`` starts), then their cache rows are left-padded and concatenated into the running
batch, which decodes one token per row per step:

    cache keys/values  [rows, kv_heads, columns, head_dim]   (columns = padding | prefix | prompt | generated)
    mask               [rows, columns]                        (0 on each row's left padding)
    positions          [rows]                                 (each row's next position id, kept per row)

Finished, stopped or cancelled rows are dropped from the batch after the step that finished them, and columns that
are padding in every remaining row are trimmed. Requests admitted at the same step are prefilled together
(left-padded; each prefix right-aligned in front of its prompt, unused slots masked). Greedy rows therefore get the
tokens they get alone. Events go back to the caller through ``Sequence.emit`` (called from the engine thread):
``("delta", text)``, ``("done", finish_reason)`` or ``("error", status, message)``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicCache

from .model import _activation_dtype
from .prefix import generation_cache, split_key_values

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server's ``max_queue``."""


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens tokens whatever the model says (benchmarks; vLLM's extension)


@dataclasses.dataclass(eq=False)
class Sequence:
    """One generated choice: its prompt, its prefix (None = the bare base) and what has been produced so far."""

    prompt_ids: list[int]
    prefix: str | None
    params: SamplingParams
    emit: Callable = lambda *event: None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # decoded reply, cut at a stop string
    sent: int = 0  # characters of ``text`` already emitted
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Called from any thread (a client went away); the engine drops the row at its next step."""
        self.cancelled = True


class Engine:
    """Owns the model in one thread; ``submit`` queues sequences, which the loop admits while it has free rows.

    ``continuous=False`` admits only into an empty batch (static batching), for comparison in ``bench/serve.py``.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 64, continuous: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.continuous = max_batch_size, max_queue, continuous
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.rows: list[Sequence] = []
        self._admitting: list[Sequence] = []  # taken from the queue, being prefilled
        self._cache = self._mask = self._positions = self._last = None
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, for tests and benchmarks
        self.peak_rows = 0  # most rows decoded in one step

    # ------------------------------------------------------------------ public API (any thread)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="ptuning-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue all choices of one request together, or none of them (``QueueFull``)."""
        with self._wake:
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.max_queue})")
            self.waiting.extend(sequences)
            self._wake.notify()

    def stats(self) -> dict:
        admitting = sum(1 for s in self._admitting if s.finish_reason is None and s not in self.rows)
        return {"running": len(self.rows) + admitting, "waiting": len(self.waiting), "steps": self.steps,
                "peak_rows": self.peak_rows}

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.waiting and not self.rows:
                    self._wake.wait()
                if self._stop:
                    break
                admitted = []
                if self.continuous or not self.rows:
                    while self.waiting and len(self.rows) + len(admitted) < self.max_batch_size:
                        admitted.append(self.waiting.popleft())
                self._admitting = admitted
            try:
                if admitted:
                    self._admit(admitted)
                self._admitting = []
                if self.rows:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows, never the server
                logger.exception("generation step failed")
                for seq in self.rows + [s for s in admitted if s.finish_reason is None]:
                    seq.finish_reason = "error"
                    seq.emit("error", 500, f"generation failed: {type(e).__name__}: {e}")
                self.rows, self._cache = [], None
            self._admitting = []
        for seq in list(self.waiting) + self.rows:
            seq.emit("error", 503, "the server is shutting down")

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        return self.model.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def _admit(self, sequences: list[Sequence]) -> None:
        """Prefill the admitted sequences together, emit their first tokens, and merge their rows into the batch.

        Prompts are left-padded to the longest; each row's prefix (none for the base) is right-aligned in a block as
        wide as the longest prefix, its unused slots masked, so every row sees exactly what it sees alone.
        """
        ready = []
        for seq in sequences:
            if seq.cancelled:
                seq.finish_reason = "cancelled"
            elif seq.prefix is not None and seq.prefix not in self.model.names:
                seq.finish_reason = "error"
                seq.emit("error", 404, f"the model {seq.prefix!r} was removed")
            else:
                ready.append(seq)
        if not ready:
            return
        device, model = self.model.device, self.model
        configs = [model.prefix_config(s.prefix) if s.prefix is not None else None for s in ready]
        longest = max([c.pre_seq_len for c in configs if c is not None], default=0)
        width = max(len(s.prompt_ids) for s in ready)
        ids = torch.full((len(ready), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(ready), longest + width, dtype=torch.long, device=device)
        offsets = torch.zeros(len(ready), 1, dtype=torch.long, device=device)
        prefixed = next((c for c in configs if c is not None), None)
        flat = torch.zeros(len(ready), longest, prefixed.prefix_width, device=device) if longest else None
        for row, (seq, config) in enumerate(zip(ready, configs)):
            n = len(seq.prompt_ids)
            ids[row, width - n:] = torch.tensor(seq.prompt_ids, device=device)
            mask[row, longest + width - n:] = 1
            if config is not None:
                mask[row, longest - config.pre_seq_len: longest] = 1
                flat[row, longest - config.pre_seq_len:] = model.prefix_weights(seq.prefix)
                offsets[row] = config.pre_seq_len if config.position_offset else 0
            if seq.params.seed is not None:
                seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
        positions = (mask[:, longest:].cumsum(-1) - 1).clamp(min=0) + offsets
        if longest:
            cache = generation_cache(split_key_values(flat, prefixed, len(ready), _activation_dtype(model.base)),
                                     model.config)
        else:
            cache = DynamicCache(config=model.config)
        logits = self._forward(ids, mask, positions, cache)
        tokens = self._sample(ready, logits)
        keep = [i for i, (seq, token) in enumerate(zip(ready, tokens)) if not self._record(seq, token)]
        if not keep:
            return
        index = torch.tensor(keep, device=device)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self._merge([ready[i] for i in keep], cache, mask[index], positions[index, -1] + 1,
                    torch.tensor([tokens[i] for i in keep], device=device))

    def _merge(self, sequences, cache, mask, next_positions, tokens) -> None:
        """Append prefilled rows to the running batch, left-padding whichever side has fewer columns."""
        if self._cache is None:
            self.rows, self._cache, self._mask = list(sequences), cache, mask
            self._positions, self._last = next_positions, tokens
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def left_pad(t, dim):
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, -2), left_pad(theirs.keys, -2)])
            mine.values = torch.cat([left_pad(mine.values, -2), left_pad(theirs.values, -2)])
        self._mask = torch.cat([left_pad(self._mask, 1), left_pad(mask, 1)])
        self._positions = torch.cat([self._positions, next_positions])
        self._last = torch.cat([self._last, tokens])
        self.rows += sequences

    @torch.no_grad()
    def _step(self) -> None:
        """One token for every row, then drop the rows that are done and the columns no row needs."""
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self._forward(self._last[:, None], self._mask, self._positions[:, None], self._cache)
        self.steps += 1
        self.peak_rows = max(self.peak_rows, len(self.rows))
        tokens = self._sample(self.rows, logits)
        keep = [i for i, (seq, token) in enumerate(zip(self.rows, tokens)) if not self._record(seq, token)]
        self._positions = self._positions + 1
        self._last = torch.tensor(tokens, device=self._last.device)
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self._cache = [], None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self.rows = [self.rows[i] for i in keep]
        self._mask, self._positions, self._last = self._mask[index], self._positions[index], self._last[index]
        start = int(self._mask.any(0).int().argmax())  # first column some row still attends to
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        self._mask = self._mask[:, start:]

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Greedy rows by argmax; sampled rows through transformers' temperature and top-p warpers."""
        tokens = logits.argmax(-1).tolist()
        for i, seq in enumerate(rows):
            p = seq.params
            if p.temperature <= 0:
                continue
            scores = TemperatureLogitsWarper(p.temperature)(None, logits[i : i + 1].float())
            if p.top_p < 1.0:
                scores = TopPLogitsWarper(p.top_p)(None, scores)
            probs = torch.softmax(scores, dim=-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
        return tokens

    def _record(self, seq: Sequence, token: int) -> bool:
        """Append a token, emit the new text; True when the sequence is finished (and told so)."""
        if seq.cancelled:
            seq.finish_reason = "cancelled"
            return True
        if token in self.eos_ids and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
        else:
            seq.output_ids.append(token)
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in seq.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, seq.finish_reason = text[:cut], "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens:
                seq.finish_reason = "length"
            seq.text = text
        ready = seq.text if seq.finish_reason else _stable(seq.text, seq.params.stop)
        if len(ready) > seq.sent:
            seq.emit("delta", ready[seq.sent:])
            seq.sent = len(ready)
        if seq.finish_reason:
            seq.emit("done", seq.finish_reason)
            return True
        return False


def _stable(text: str, stops: tuple[str, ...]) -> str:
    """The part of ``text`` that later tokens cannot change: no half-decoded character, no partial stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return text[:end]
