"""Generation metrics: BLEU-4 and ROUGE-1/2/L as ChatGLM-6B's ``ptuning/main.py`` computes them, plus exact match.

Every score is in [0, 100]. Per pair, a text containing a CJK character is scored the Chinese way (BLEU over
characters, ROUGE over ``jieba`` words), anything else the English way (BLEU and ROUGE over word/punctuation tokens,
case-sensitive). BLEU is nltk's ``sentence_bleu`` with ``SmoothingFunction().method3``; ROUGE is ``rouge_chinese``
(F-scores). Each pair's score is rounded to 4 decimals and the mean over pairs is reported, as ChatGLM does.

Edge cases, decided here rather than by the libraries: an empty (or all-whitespace) prediction scores 0 against a
non-empty reference (``rouge_chinese`` would raise), and two empty strings score 100. Like ChatGLM's numbers, BLEU-4
of an identical text shorter than 4 tokens is below 100 (the missing n-gram orders are smoothed, not skipped):
use ``exact_match`` for short label-set answers.
"""

from __future__ import annotations

import logging
import re

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def is_chinese(text: str) -> bool:
    return bool(CJK.search(text))


def _language(prediction: str, reference: str, language: str) -> str:
    if language not in ("auto", "zh", "en"):
        raise ValueError(f"language must be 'auto', 'zh' or 'en', got {language!r}")
    if language != "auto":
        return language
    return "zh" if is_chinese(prediction) or is_chinese(reference) else "en"


def _words(text: str, language: str) -> list[str]:
    """ROUGE tokens: jieba words for Chinese, word/punctuation runs (nltk's wordpunct, no data files) for English."""
    if language == "zh":
        import jieba

        jieba.setLogLevel(logging.WARNING)
        return [w for w in jieba.cut(text) if w.strip()]
    from nltk.tokenize import wordpunct_tokenize

    return wordpunct_tokenize(text)


def bleu4(prediction: str, reference: str, language: str = "auto") -> float:
    """Sentence BLEU-4 × 100: characters for Chinese (ChatGLM's ``list(text)``), word tokens for English."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    lang = _language(prediction, reference, language)
    if not prediction.strip() or not reference.strip():
        return 100.0 if not prediction.strip() and not reference.strip() else 0.0
    if lang == "zh":
        hyp, ref = list(prediction), list(reference)
    else:
        hyp, ref = _words(prediction, "en"), _words(reference, "en")
    return round(sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3) * 100, 4)


def rouge(prediction: str, reference: str, language: str = "auto") -> dict[str, float]:
    """ROUGE-1/2/L F-scores × 100 from ``rouge_chinese`` on space-joined tokens (ChatGLM joins jieba words)."""
    from rouge_chinese import Rouge

    lang = _language(prediction, reference, language)
    hyp, ref = " ".join(_words(prediction, lang)), " ".join(_words(reference, lang))
    if not hyp or not ref:
        value = 100.0 if not hyp and not ref else 0.0
        return {k: value for k in ROUGE_KEYS}
    scores = Rouge().get_scores(hyp, ref)[0]
    return {k: round(scores[k]["f"] * 100, 4) for k in ROUGE_KEYS}


def exact_match(prediction: str, reference: str) -> float:
    """100 when the texts are equal after stripping surrounding whitespace."""
    return 100.0 if prediction.strip() == reference.strip() else 0.0


def normalize_label(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding punctuation removed: "Positive." and "positive" match."""
    return EDGE_PUNCT.sub("", " ".join(text.casefold().split()))


def is_label_set(references: list[str]) -> bool:
    """Short one-line references that repeat look like classification labels."""
    return (len(references) > 1 and len(set(references)) < len(references)
            and all(0 < len(r.strip()) <= 32 and "\n" not in r.strip() for r in references))


def compute_metrics(predictions: list[str], references: list[str], language: str = "auto",
                    label_set: bool | None = None) -> dict[str, float]:
    """Mean scores over pairs: ``bleu-4``, ``rouge-1``, ``rouge-2``, ``rouge-l``, ``exact_match``, and ``accuracy``
    (normalised label match) when ``label_set`` is True, or None and the references look like a label set."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    columns: dict[str, list[float]] = {"bleu-4": [], **{k: [] for k in ROUGE_KEYS}, "exact_match": []}
    for pred, ref in zip(predictions, references):
        columns["bleu-4"].append(bleu4(pred, ref, language))
        for k, v in rouge(pred, ref, language).items():
            columns[k].append(v)
        columns["exact_match"].append(exact_match(pred, ref))
    if label_set or (label_set is None and is_label_set(references)):
        columns["accuracy"] = [100.0 if normalize_label(p) == normalize_label(r) else 0.0
                               for p, r in zip(predictions, references)]
    return {k: round(sum(v) / len(v), 4) for k, v in columns.items()}
