"""Self-distillation from the frozen base: a KL term that keeps the prefixed model's replies to unrelated prompts
where the base model's own replies are.

Prefix tuning has the teacher for free: the base model without the prefix is the same weights, no second copy.
At the start of training the base writes its own greedy reply to each retention prompt (``prefix_disabled()``).
Every training step then adds ``kl_weight * KL(base || prefixed)``, averaged over the reply tokens (and the token
that starts the reply) of ``retention_rows`` such conversations, to the task loss; only the prefix gets gradients.
"""

from __future__ import annotations

import logging

import torch
from torch.nn import functional as F

from .data import Collator, IGNORE_INDEX, encode_example
from .errors import UserError
from .infer import generate_replies

logger = logging.getLogger(__name__)


def kl_to_base(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over target tokens of KL(base ‖ prefixed) of the next-token distributions; gradients reach the prefix
    only (the teacher is the frozen base run without the prefix, under no_grad)."""
    select = labels[:, 1:] != IGNORE_INDEX
    if not select.any():
        return model.prefix_encoder.embedding.weight.sum() * 0.0
    with torch.no_grad():
        teacher = model.base(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][select]
    student = model(input_ids, attention_mask).logits[:, :-1][select]
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                    reduction="batchmean")


class RetentionDistiller:
    """Retention conversations (prompt + the base model's own reply) served ``rows`` at a time, round robin in a
    seeded order, each batch scored by ``kl_to_base``."""

    def __init__(self, model, tokenizer, conversations: list[list[dict]], weight: float, rows: int,
                 max_source_length: int = 256, max_new_tokens: int = 64, seed: int = 0):
        if weight < 0:
            raise UserError(f"--kl_weight: expected a number >= 0, got {weight}")
        if rows < 1:
            raise UserError(f"--retention_rows: expected a positive integer, got {rows}")
        if not conversations:
            raise UserError("--kl_weight: the retention prompts are empty")
        self.weight, self.rows = weight, rows
        prompts = [c[:-1] if c[-1]["role"] == "assistant" else c for c in conversations]
        with model.prefix_disabled():
            replies = generate_replies(model, tokenizer, prompts, max_source_length, max_new_tokens)
        self.examples = [encode_example(tokenizer, p + [{"role": "assistant", "content": r, "loss": True}], max_source_length,
                                        max_new_tokens + 1) for p, r in zip(prompts, replies)]
        self.collate = Collator(pad_token_id=tokenizer.pad_token_id, padding_side="right")
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        logger.info("self-distillation: %d retention prompts, %d per step, weight %g", len(prompts), rows, weight)

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = []
        while len(batch) < self.rows:
            if not self.order:
                self.order = torch.randperm(len(self.examples), generator=self.generator).tolist()
            batch.append(self.examples[self.order.pop()])
        return self.collate(batch)

    def loss(self, model) -> torch.Tensor:
        """``weight * kl_to_base`` on the next retention batch."""
        batch = {k: v.to(model.device) for k, v in self.next_batch().items()}
        return self.weight * kl_to_base(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


# Used when --kl_weight is given without --retention_file: everyday requests unrelated to any one task.
DEFAULT_RETENTION_PROMPTS = [
    "How can I be more productive in the morning?", "Write a two-line poem about autumn.", "What is 15 plus 27?",
    "Explain gravity to a child.", "Give me a recipe idea for dinner.", "What are the benefits of drinking water?",
    "Describe a cat in three words.", "How do airplanes fly?", "Write a short birthday message for a friend.",
    "What is the difference between weather and climate?", "List three primary colors.",
    "How do I start learning to code?", "Tell me a joke about computers.", "What makes a good leader?",
    "Summarize the story of Cinderella in two sentences.", "Why do leaves change color in the fall?",
    "Give me an idea for a weekend hobby.", "How many days are in a leap year?", "What is a healthy breakfast?",
    "Write a motivational sentence for a student.", "How does a rainbow form?", "What is the boiling point of water?",
    "Suggest a title for a mystery novel.", "How can I save money on groceries?",
    "用一句话介绍一下你自己。", "给我推荐一本适合周末读的书。", "如何保持健康的作息？", "写一句关于春天的诗。",
]


def retention_conversations(path: str | None) -> list[list[dict]]:
    """The prompts of ``path`` (validated like training data; replies are dropped), or the built-in list."""
    if not path:
        return [[{"role": "user", "content": p}] for p in DEFAULT_RETENTION_PROMPTS]
    from .data import ColumnSpec, load_rows, validate_rows

    conversations = validate_rows(load_rows(path), ColumnSpec(), path)
    return [c[:-1] if c and c[-1]["role"] == "assistant" else c for c in conversations]
