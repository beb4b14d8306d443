"""Metrics for understanding tasks, dependency-free: accuracy and macro-F1, seqeval-style entity F1, SQuAD EM/F1."""

from __future__ import annotations

import collections
import re
import string


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def classification_metrics(gold: list, predicted: list) -> dict:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1 over every class seen in gold or predictions,
    0 for a class never predicted correctly — scikit-learn's ``f1_score(average="macro")``)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    classes = sorted(set(map(str, gold)) | set(map(str, predicted)))
    gold_s, pred_s = [str(g) for g in gold], [str(p) for p in predicted]
    f1s = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold_s, pred_s))
        n_pred, n_gold = pred_s.count(c), gold_s.count(c)
        f1s.append(_f1(tp / n_pred if n_pred else 0.0, tp / n_gold if n_gold else 0.0))
    return {"accuracy": sum(g == p for g, p in zip(gold_s, pred_s)) / len(gold), "macro_f1": sum(f1s) / len(f1s)}


def get_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) spans from BIO/IOB2 (or IOBES) tags, with seqeval's default (non-strict) chunking rules:
    an ``I-X`` that does not continue an ``X`` entity starts a new one."""
    entities = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate(list(tags) + ["O"]):
        tag = chunk[0] if chunk else "O"
        kind = chunk[1:].split("-", 1)[-1] or "_"
        if tag not in "BIES":
            tag, kind = "O", "_"
        if _chunk_ends(prev_tag, tag, prev_type, kind):
            entities.append((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, tag, prev_type, kind):
            begin = i
        prev_tag, prev_type = tag, kind
    return entities


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    return (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag != "O" and prev_type != kind))


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    return (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag != "O" and prev_type != kind))


def entity_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Micro precision/recall/F1 over exact entity spans (type, start, end), as seqeval reports them, plus token
    accuracy."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sequences but {len(predicted)} predictions")
    n_gold = n_pred = tp = tokens = correct = 0
    for g, p in zip(gold, predicted):
        if len(g) != len(p):
            raise ValueError(f"a sequence of {len(g)} gold tags has {len(p)} predicted tags")
        gold_entities, pred_entities = set(get_entities(g)), set(get_entities(p))
        n_gold, n_pred = n_gold + len(gold_entities), n_pred + len(pred_entities)
        tp += len(gold_entities & pred_entities)
        tokens += len(g)
        correct += sum(a == b for a, b in zip(g, p))
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
            "accuracy": correct / tokens if tokens else 0.0}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # no-answer: right only when both are empty
        return float(pred_tokens == gold_tokens)
    common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    return _f1(common / len(pred_tokens), common / len(gold_tokens))


def squad_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """SQuAD (v2) exact match and F1 in percent: each question scores its best gold answer; a question with no gold
    answer scores 1 only for an empty prediction."""
    if not references:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for qid, golds in references.items():
        golds = [g for g in golds if normalize_answer(g)] or [""]
        prediction = predictions.get(qid, "")
        em += max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
        f1 += max(_token_f1(prediction, g) for g in golds)
    return {"exact_match": 100 * em / len(references), "f1": 100 * f1 / len(references)}
