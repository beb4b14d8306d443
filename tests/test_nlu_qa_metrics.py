"""Hand-made checks of QA windows and answer post-processing, and of the NLU metrics."""

import numpy as np
import pytest

from nlu_tiny import write_tokenizer
from ptuning.errors import UserError
from ptuning.nlu import metrics, qa

CONTEXT = "alice lives in paris . bob lives in london . carol lives in berlin ."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def example(question, answer, qid="q"):
    if answer is None:
        return {"id": qid, "question": question, "context": CONTEXT, "answers": {"text": [], "answer_start": []}}
    return {"id": qid, "question": question, "context": CONTEXT,
            "answers": {"text": [answer], "answer_start": [CONTEXT.index(answer)]}}


def window_texts(tokenizer, feature):
    return [tokenizer.convert_ids_to_tokens(i) for i, o in zip(feature["input_ids"], feature["offset_mapping"]) if o]


def test_long_context_is_cut_into_overlapping_windows_labelled_where_the_answer_is(tokenizer):
    # 5 question tokens + [CLS] + 2 [SEP] leave 8 of the 15 context tokens per 16-token window
    ex = example("who lives in berlin ?", "berlin")
    features = qa.prepare_features(tokenizer, [ex], max_length=16, doc_stride=3, with_labels=True)
    assert len(features) == 3
    assert all(len(f["input_ids"]) == 16 and f["example_index"] == 0 for f in features)
    windows = [window_texts(tokenizer, f) for f in features]
    assert windows[0][-3:] == windows[1][:3]  # consecutive windows share doc_stride tokens
    for f, words in zip(features, windows):
        if "berlin" in words:
            span = f["offset_mapping"][f["start_positions"]], f["offset_mapping"][f["end_positions"]]
            assert CONTEXT[span[0][0]:span[1][1]] == "berlin"
        else:
            assert f["start_positions"] == f["end_positions"] == 0  # [CLS]: the answer is not in this window
    assert sum(f["start_positions"] > 0 for f in features) == 1


def test_no_answer_example_points_every_window_at_cls(tokenizer):
    features = qa.prepare_features(tokenizer, [example("who lives in rome ?", None)], 16, 3, with_labels=True)
    assert all(f["start_positions"] == f["end_positions"] == 0 for f in features)


def first_context(feature) -> int:
    return next(k for k, o in enumerate(feature["offset_mapping"]) if o is not None)


def test_a_question_too_long_for_the_window_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="question 'q' is 5 tokens long, which leaves 3 context tokens .* --doc_stride 3"):
        qa.prepare_features(tokenizer, [example("who lives in berlin ?", "berlin")], 11, 3, with_labels=True)


def logits_for(features, wanted: dict, null: dict | None = None, length=16):
    """Start/end logits that put ``wanted[window] = (start_tok, end_tok, score)`` on top; null scores on [CLS]."""
    starts, ends = np.full((len(features), length), -10.0), np.full((len(features), length), -10.0)
    for f in range(len(features)):
        starts[f, 0] = ends[f, 0] = (null or {}).get(f, -5.0)
    for f, (s, e, score) in wanted.items():
        starts[f, s] = ends[f, e] = score
    return starts, ends


def test_answer_found_in_a_later_window_is_mapped_back_to_context_characters(tokenizer):
    ex = example("who lives in berlin ?", "berlin")
    features = qa.prepare_features(tokenizer, [ex], 16, 3, with_labels=True)
    last = len(features) - 1
    target = features[last]
    # a wrong, weaker span in window 0 and the right one in the last window
    first = first_context(features[0])
    starts, ends = logits_for(features, {0: (first, first + 1, 1.0),
                                         last: (target["start_positions"], target["end_positions"], 4.0)})
    assert qa.postprocess_predictions([ex], features, starts, ends) == {"q": "berlin"}


def test_answer_spanning_several_tokens_across_a_window_boundary_is_kept_whole(tokenizer):
    """"bob lives in london" straddles the first window's end; the second window holds it whole and wins."""
    ex = example("who lives in berlin ?", "bob lives in london")
    features = qa.prepare_features(tokenizer, [ex], 16, 3, with_labels=True)
    whole = [i for i, f in enumerate(features) if f["start_positions"] > 0]
    assert len(whole) == 1 and whole[0] > 0
    f = features[whole[0]]
    # window 0 only sees "bob lives" at its end: an in-window partial span scores lower than the whole one
    partial_end = max(k for k, o in enumerate(features[0]["offset_mapping"]) if o)
    starts, ends = logits_for(features, {0: (partial_end - 1, partial_end, 2.0),
                                         whole[0]: (f["start_positions"], f["end_positions"], 3.0)})
    assert qa.postprocess_predictions([ex], features, starts, ends) == {"q": "bob lives in london"}


def test_no_answer_wins_when_the_null_score_beats_every_span(tokenizer):
    ex = example("who lives in rome ?", None)
    features = qa.prepare_features(tokenizer, [ex], 16, 3, with_labels=False)
    first = first_context(features[0])
    assert len(features) > 1
    starts, ends = logits_for(features, {0: (first, first, 1.0)}, null={i: 3.0 for i in range(len(features))})
    assert qa.postprocess_predictions([ex], features, starts, ends) == {"q": ""}
    # the null score is the smallest over windows: one confident window is enough for a span to win
    starts, ends = logits_for(features, {0: (first, first, 1.0)}, null={0: -3.0, 1: 3.0})
    assert qa.postprocess_predictions([ex], features, starts, ends)["q"] != ""
    assert qa.postprocess_predictions([ex], features, *logits_for(features, {}, null={0: 3.0}),
                                      allow_no_answer=False)["q"] != ""


def test_spans_outside_the_context_reversed_or_too_long_are_skipped(tokenizer):
    ex = example("who lives in london ?", "london")
    features = qa.prepare_features(tokenizer, [ex], 64, 16, with_labels=True)
    assert len(features) == 1
    f = features[0]
    s, e = f["start_positions"], f["end_positions"]
    starts, ends = logits_for(features, {0: (s, e, 1.0)}, length=64)
    starts[0, 1] = ends[0, 1] = 9.0  # inside the question
    starts[0, e + 2] = ends[0, s - 1] = 8.0  # a high start after a high end
    assert qa.postprocess_predictions([ex], features, starts, ends) == {"q": "london"}
    first = first_context(f)
    starts, ends = logits_for(features, {0: (s, e, 1.0)}, length=64)
    starts[0, first] = ends[0, e] = 5.0  # "alice lives ... london": best score, 9 tokens long
    assert qa.postprocess_predictions([ex], features, starts, ends)["q"] == CONTEXT[: CONTEXT.index("london") + 6]
    assert qa.postprocess_predictions([ex], features, starts, ends, max_answer_length=2) == {"q": "london"}


def test_squad_exact_match_and_f1():
    predictions = {"1": "the Eiffel tower!", "2": "", "3": "in paris", "4": "berlin"}
    references = {"1": ["Eiffel Tower"], "2": [], "3": ["paris france", "Paris"], "4": []}
    scores = metrics.squad_metrics(predictions, references)
    assert scores["exact_match"] == pytest.approx(100 * 2 / 4)  # 1 and 2
    assert scores["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3 + 0) / 4)  # "in paris" vs "paris": P 1/2 R 1 → 2/3


def test_entity_f1_is_seqeval_style():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["I-ORG", "O", "B-MISC"]]
    scores = metrics.entity_metrics(gold, pred)
    # gold: PER(0-1) LOC(3) ORG(0); predicted: PER(0-1) ORG(3) ORG(0: I- starts an entity) MISC(2)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert scores["accuracy"] == pytest.approx(4 / 7)
    assert metrics.get_entities(["B-LOC", "I-PER", "I-PER", "O", "I-LOC"]) == [("LOC", 0, 0), ("PER", 1, 2),
                                                                              ("LOC", 4, 4)]


def test_accuracy_and_macro_f1_match_scikit_learn_definitions():
    scores = metrics.classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", "b"])
    assert scores["accuracy"] == 0.5
    # F1 a = 2/3, b = 1/2, c = 0
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert metrics.classification_metrics([1, 0, 1], [1, 0, 1]) == {"accuracy": 1.0, "macro_f1": 1.0}
