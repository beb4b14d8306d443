"""Extractive QA: SQuAD-style overflow/stride features and answer-span post-processing.

Long contexts are cut into windows of ``max_length`` tokens that overlap by ``doc_stride`` tokens
(``return_overflowing_tokens``), each window paired with the whole question. A training window whose context does not
fully contain the answer is labelled with the [CLS] position (index 0), like Hugging Face's ``run_qa.py``.

Post-processing scores every (start, end) pair among the ``n_best`` largest start and end logits of every window of
an example, keeps spans that lie inside the context, end after they start and are at most ``max_answer_length``
tokens long, and maps the best one back to the characters of the context through the offset mapping. The null
answer scores ``start_logit[0] + end_logit[0]``, the smallest over the example's windows (SQuAD v2); it wins when it
beats the best span by more than ``null_score_diff_threshold``, and the prediction is then ``""``.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError


def prepare_features(tokenizer, examples: list[dict], max_length: int, doc_stride: int, with_labels: bool) -> list[dict]:
    """Features (one per window) for ``examples`` rows of ``{"id", "question", "context", "answers"}``.

    Each feature holds ``input_ids``/``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them),
    ``example_index``, and ``offset_mapping`` with ``None`` outside the context; with ``with_labels`` also
    ``start_positions``/``end_positions``.
    """
    if not examples:
        return []
    _check_room(tokenizer, examples, max_length, doc_stride)
    pad_right = tokenizer.padding_side == "right"
    questions = [e["question"].lstrip() for e in examples]
    contexts = [e["context"] for e in examples]
    encoded = tokenizer(
        questions if pad_right else contexts,
        contexts if pad_right else questions,
        truncation="only_second" if pad_right else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    context_index = 1 if pad_right else 0
    features = []
    for i, offsets in enumerate(encoded["offset_mapping"]):
        example_index = encoded["overflow_to_sample_mapping"][i]
        sequence_ids = encoded.sequence_ids(i)
        feature = {k: encoded[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
        feature["example_index"] = example_index
        feature["offset_mapping"] = [o if sequence_ids[k] == context_index else None for k, o in enumerate(offsets)]
        if with_labels:
            feature["start_positions"], feature["end_positions"] = _answer_positions(
                examples[example_index]["answers"], feature["offset_mapping"], feature["input_ids"],
                tokenizer.cls_token_id)
        features.append(feature)
    return features


def _check_room(tokenizer, examples: list[dict], max_length: int, doc_stride: int) -> None:
    """Each window must hold more context tokens than it shares with the next (the tokenizer would panic)."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = tokenizer([e["question"].lstrip() for e in examples], add_special_tokens=False)["input_ids"]
    for e, ids in zip(examples, lengths):
        room = max_length - specials - len(ids)
        if room <= doc_stride:
            raise UserError(f"question {e['id']!r} is {len(ids)} tokens long, which leaves {max(room, 0)} context "
                            f"tokens per window of --max_source_length {max_length}; that must exceed --doc_stride "
                            f"{doc_stride}")


def _answer_positions(answers: dict, offsets: list, input_ids: list[int], cls_token_id) -> tuple[int, int]:
    """Token positions of the first gold answer in this window, or the [CLS] index when the window lacks it."""
    cls_index = input_ids.index(cls_token_id) if cls_token_id in input_ids else 0
    if not answers["text"]:
        return cls_index, cls_index
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    inside = [k for k, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return cls_index, cls_index
    start = next(k for k in inside if offsets[k][1] > start_char)
    end = next(k for k in reversed(inside) if offsets[k][0] < end_char)
    return start, end


def postprocess_predictions(examples: list[dict], features: list[dict], start_logits, end_logits, n_best: int = 20,
                            max_answer_length: int = 30, allow_no_answer: bool = True,
                            null_score_diff_threshold: float = 0.0) -> dict[str, str]:
    """``{example id: answer text}`` from per-feature start/end logits (see the module docstring)."""
    if len(features) != len(start_logits) or len(features) != len(end_logits):
        raise ValueError(f"{len(features)} features but {len(start_logits)}/{len(end_logits)} logit rows")
    by_example: dict[int, list[int]] = {}
    for f, feature in enumerate(features):
        by_example.setdefault(feature["example_index"], []).append(f)
    answers = {}
    for e, example in enumerate(examples):
        best_text, best_score, null_score = "", -np.inf, np.inf
        for f in by_example.get(e, []):
            starts, ends = np.asarray(start_logits[f]), np.asarray(end_logits[f])
            offsets = features[f]["offset_mapping"]
            null_score = min(null_score, float(starts[0] + ends[0]))
            top_starts = np.argsort(starts)[::-1][:n_best]
            top_ends = np.argsort(ends)[::-1][:n_best]
            for s in top_starts:
                if s >= len(offsets) or offsets[s] is None:
                    continue
                for t in top_ends:
                    if t >= len(offsets) or offsets[t] is None or t < s or t - s + 1 > max_answer_length:
                        continue
                    score = float(starts[s] + ends[t])
                    if score > best_score:
                        best_score = score
                        best_text = example["context"][offsets[s][0] : offsets[t][1]]
        if allow_no_answer and (best_score == -np.inf or null_score > best_score + null_score_diff_threshold):
            best_text = ""
        answers[example["id"]] = best_text
    return answers
