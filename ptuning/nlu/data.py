"""Rows → validated examples → model features for classification, BIO token labelling and SQuAD-style QA.

Files are read with ``ptuning.data.load_rows`` (json, jsonl, csv, parquet or a ``save_to_disk`` directory) and every
row is checked before a model is loaded; a bad row stops the run with one line naming the file, row and field.

Columns (``--text_column/--text_pair_column/--label_column``; unset ones are looked up among the usual names):

- ``seq_cls``: text (``text``/``sentence``), optional second text, label (``label``/``labels``): a string or an int.
- ``token_cls``: tokens (``tokens``/``words``: a list of words, or a string split on whitespace) and one BIO tag per
  word (``tags``/``ner_tags``/``labels``: a list, or a whitespace-separated string).
- ``qa``: ``question``, ``context`` and ``answers`` = ``{"text": [...], "answer_start": [...]}`` (the SQuAD /
  ``datasets`` layout) or a list of ``{"text", "answer_start"}``; an empty list means "no answer". ``id`` is optional.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data import load_rows
from ..errors import UserError
from . import qa

TASK_TYPES = ("seq_cls", "token_cls", "qa")
CANDIDATES = {
    "seq_cls": (("text", "sentence"), (), ("label", "labels")),
    "token_cls": (("tokens", "words"), (), ("tags", "ner_tags", "labels")),
    "qa": (("question",), ("context",), ("answers",)),
}


@dataclass
class NluColumns:
    text: str | None = None
    text_pair: str | None = None
    label: str | None = None

    def resolve(self, task_type: str, row: dict, path: str) -> "NluColumns":
        """Fill unset columns from the first row; a column that was asked for (or is required) must exist."""
        texts, pairs, labels = CANDIDATES[task_type]

        def pick(given, names, what, required=True):
            if given:
                return given
            found = next((n for n in names if n in row), None)
            if found is None and required:
                flag = {"text": "--text_column", "pair": "--text_pair_column", "label": "--label_column"}[what]
                raise UserError(f"{path}: row 1: no {'/'.join(repr(n) for n in names)} column (columns: "
                                f"{', '.join(map(repr, row)) or 'none'}); name it with {flag}")
            return found

        return NluColumns(pick(self.text, texts, "text"), pick(self.text_pair, pairs, "pair", task_type == "qa"),
                          pick(self.label, labels, "label", False))


def _fail(path: str, index: int, field: str, problem: str):
    raise UserError(f"{path}: row {index + 1}: field '{field}': {problem}")


def _text(row: dict, column: str, path: str, index: int) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        _fail(path, index, column, f"expected a non-empty string, got {_brief(value)}")
    return value


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _words(value, column: str, path: str, index: int) -> list[str]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(w, (str, int)) for w in value):
        _fail(path, index, column, f"expected a non-empty list of strings, got {_brief(value)}")
    return [str(w) for w in value]


def _label(value, column: str, path: str, index: int):
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        _fail(path, index, column, f"expected a string or integer label, got {_brief(value)}")
    return value


def _answers(row: dict, column: str, context: str, path: str, index: int) -> dict:
    value = row.get(column)
    if isinstance(value, list):
        if not all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in value):
            _fail(path, index, column, "expected {'text': [...], 'answer_start': [...]} or a list of "
                                       f"{{'text', 'answer_start'}}, got {_brief(value)}")
        value = {"text": [a["text"] for a in value], "answer_start": [a["answer_start"] for a in value]}
    if not isinstance(value, dict) or not isinstance(value.get("text"), list) or \
            not isinstance(value.get("answer_start"), list) or len(value["text"]) != len(value["answer_start"]):
        _fail(path, index, column, "expected {'text': [...], 'answer_start': [...]} of equal lengths, got "
                                   f"{_brief(value)}")
    for text, start in zip(value["text"], value["answer_start"]):
        if not isinstance(text, str) or not text or isinstance(start, bool) or not isinstance(start, int):
            _fail(path, index, column, f"answer {text!r} at {start!r}: expected a non-empty string and an integer")
        if context[start : start + len(text)] != text:
            _fail(path, index, column, f"answer {text!r} is not at character {start} of the context "
                                       f"(found {context[start : start + len(text)]!r})")
    return {"text": list(value["text"]), "answer_start": list(value["answer_start"])}


def validate_examples(rows: list[dict], task_type: str, columns: NluColumns, path: str,
                      require_labels: bool = True) -> list[dict]:
    """Normalised examples; labels are required for training/validation files and optional in a test file."""
    cols = columns.resolve(task_type, rows[0], path)
    if require_labels and cols.label is None:
        cols = NluColumns(cols.text, cols.text_pair, CANDIDATES[task_type][2][0])
    examples = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i + 1}: expected an object, got {_brief(row)}")
        has_label = cols.label is not None and row.get(cols.label) is not None
        if require_labels and not has_label:
            _fail(path, i, cols.label, "missing (labels are required in training and validation files)")
        if task_type == "seq_cls":
            example = {"text": _text(row, cols.text, path, i)}
            if cols.text_pair:
                example["text_pair"] = _text(row, cols.text_pair, path, i)
            example["label"] = _label(row[cols.label], cols.label, path, i) if has_label else None
        elif task_type == "token_cls":
            example = {"tokens": _words(row.get(cols.text), cols.text, path, i), "tags": None}
            if has_label:
                tags = _words(row[cols.label], cols.label, path, i)
                if len(tags) != len(example["tokens"]):
                    _fail(path, i, cols.label, f"{len(tags)} tags for {len(example['tokens'])} tokens")
                example["tags"] = tags
        else:
            context = _text(row, cols.text_pair, path, i)
            example = {"id": str(row.get("id", i)), "question": _text(row, cols.text, path, i), "context": context,
                       "answers": _answers(row, cols.label, context, path, i) if has_label else None}
        examples.append(example)
    if task_type == "qa":
        ids = [e["id"] for e in examples]
        if len(set(ids)) != len(ids):
            raise UserError(f"{path}: duplicate question ids")
    return examples


def read_examples(path: str, task_type: str, columns: NluColumns, require_labels: bool = True) -> list[dict]:
    return validate_examples(load_rows(path), task_type, columns, path, require_labels)


def _label_values(examples: list[dict], task_type: str) -> list:
    if task_type == "seq_cls":
        return [e["label"] for e in examples if e["label"] is not None]
    return [t for e in examples if e["tags"] for t in e["tags"]]


def label_list(task_type: str, *example_sets: list[dict]) -> list:
    """The classes in head order: integers sorted numerically (so label ``k`` is class ``k``), strings sorted, BIO
    tags with ``O`` first; empty for QA."""
    if task_type == "qa":
        return []
    values = {v for examples in example_sets for v in _label_values(examples, task_type)}
    if any(isinstance(v, int) for v in values) and any(isinstance(v, str) for v in values):
        values = {str(v) for v in values}
    if task_type == "token_cls":
        return sorted(values, key=lambda t: (t != "O", t[2:], t))
    labels = sorted(values)
    if len(labels) < 2:
        raise UserError(f"classification needs at least 2 distinct labels, found {labels}")
    return labels


def check_labels(examples: list[dict], task_type: str, labels: list, path: str) -> None:
    """Training/validation labels must be ones the head predicts."""
    known = {str(v) for v in labels}
    unknown = sorted({str(v) for v in _label_values(examples, task_type)} - known)
    if unknown:
        raise UserError(f"{path}: labels {unknown[:5]} are not among the checkpoint's labels {labels}")


def encode(tokenizer, examples: list[dict], task_type: str, labels: list, max_length: int, doc_stride: int = 128,
           with_labels: bool = True) -> list[dict]:
    """Model features. For ``token_cls`` each feature keeps ``word_ids`` (dropped by the collator wrapper) so
    predictions map back to words: only a word's first sub-token is labelled, the rest get -100."""
    index = {str(v): i for i, v in enumerate(labels)}
    if task_type == "qa":
        return qa.prepare_features(tokenizer, examples, max_length, doc_stride, with_labels)
    features = []
    if task_type == "seq_cls":
        for e in examples:
            f = dict(tokenizer(e["text"], e.get("text_pair"), truncation=True, max_length=max_length))
            if with_labels and e["label"] is not None:
                f["labels"] = index[str(e["label"])]
            features.append(f)
        return features
    for e in examples:
        enc = tokenizer(e["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        f = dict(enc)
        word_ids = enc.word_ids()
        f["word_ids"] = [-1 if w is None else w for w in word_ids]
        if with_labels and e["tags"] is not None:
            previous = None
            tag_ids = []
            for w in word_ids:
                tag_ids.append(-100 if w is None or w == previous else index[e["tags"][w]])
                previous = w
            f["labels"] = tag_ids
        features.append(f)
    return features


def word_predictions(features: list[dict], predictions, labels: list, examples: list[dict]) -> list[list[str]]:
    """Per-word tags from per-token predicted class ids: a word takes its first sub-token's class; words cut off by
    ``max_length`` get ``O``."""
    out = []
    for f, pred, e in zip(features, predictions, examples):
        tags = ["O"] * len(e["tokens"])
        seen = set()
        for k, w in enumerate(f["word_ids"]):
            if w >= 0 and w not in seen:
                seen.add(w)
                tags[w] = str(labels[int(pred[k])])
        out.append(tags)
    return out
