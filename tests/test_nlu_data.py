"""NLU rows: column detection, one-line validation errors, label lists, tokenisation and word alignment."""

import json

import pytest

from nlu_tiny import write_tokenizer
from ptuning.errors import UserError
from ptuning.nlu.data import NluColumns, encode, label_list, read_examples, validate_examples, word_predictions


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_classification_columns_are_detected_and_labels_keep_their_type(tmp_path):
    rows = [{"sentence": "great film", "label": 1}, {"sentence": "awful", "label": 0}, {"sentence": "ok", "label": 2}]
    examples = read_examples(write(tmp_path / "t.jsonl", rows), "seq_cls", NluColumns())
    assert examples[0] == {"text": "great film", "label": 1}
    assert label_list("seq_cls", examples) == [0, 1, 2]  # integer k is class k
    named = validate_examples([{"q": "a", "p": "b", "y": "yes"}, {"q": "c", "p": "d", "y": "no"}], "seq_cls",
                              NluColumns("q", "p", "y"), "f")
    assert named[0] == {"text": "a", "text_pair": "b", "label": "yes"} and label_list("seq_cls", named) == ["no", "yes"]


def test_token_tags_put_o_first_and_accept_whitespace_strings():
    examples = validate_examples([{"tokens": "alice visited paris", "tags": "B-PER O B-LOC"}], "token_cls",
                                 NluColumns(), "f")
    assert examples == [{"tokens": ["alice", "visited", "paris"], "tags": ["B-PER", "O", "B-LOC"]}]
    assert label_list("token_cls", examples) == ["O", "B-LOC", "B-PER"]
    other = validate_examples([{"words": ["bob"], "ner_tags": ["B-PER"]}], "token_cls", NluColumns(), "f")
    assert other == [{"tokens": ["bob"], "tags": ["B-PER"]}]


@pytest.mark.parametrize("task_type,rows,message", [
    ("seq_cls", [{"text": "a", "label": 1}, {"text": "", "label": 0}], "f: row 2: field 'text': expected a non-empty"),
    ("seq_cls", [{"text": "a", "label": 1}, {"text": "b"}], "f: row 2: field 'label': missing"),
    ("seq_cls", [{"text": "a", "label": [1]}], "row 1: field 'label': expected a string or integer label"),
    ("seq_cls", [{"body": "a", "label": 1}], "f: row 1: no 'text'/'sentence' column \\(columns: 'body', 'label'\\); "
                                             "name it with --text_column"),
    ("token_cls", [{"tokens": ["a", "b"], "tags": ["O"]}], "row 1: field 'tags': 1 tags for 2 tokens"),
    ("qa", [{"question": "q?", "context": "abc", "answers": {"text": ["bc"], "answer_start": [0]}}],
     "row 1: field 'answers': answer 'bc' is not at character 0 of the context \\(found 'ab'\\)"),
    ("qa", [{"question": "q?", "context": "abc", "answers": "bc"}], "row 1: field 'answers': expected"),
    ("qa", [{"question": "q?", "answers": []}], "no 'context' column"),
])
def test_bad_rows_are_one_line_errors(task_type, rows, message):
    with pytest.raises(UserError, match=message):
        validate_examples(rows, task_type, NluColumns(), "f")


def test_labels_are_optional_in_a_test_file_and_qa_answers_come_in_two_layouts():
    assert validate_examples([{"text": "a"}], "seq_cls", NluColumns(), "f", require_labels=False)[0]["label"] is None
    rows = [{"id": "x", "question": "q?", "context": "abc", "answers": [{"text": "bc", "answer_start": 1}]},
            {"question": "r?", "context": "abc", "answers": []}]
    examples = validate_examples(rows, "qa", NluColumns(), "f")
    assert examples[0]["answers"] == {"text": ["bc"], "answer_start": [1]}
    assert examples[1] == {"id": "1", "question": "r?", "context": "abc", "answers": {"text": [], "answer_start": []}}
    assert label_list("qa", examples) == []


def test_one_label_is_not_a_classification_task():
    with pytest.raises(UserError, match="at least 2 distinct labels"):
        label_list("seq_cls", [{"text": "a", "label": "x"}])


def test_sentence_pairs_get_token_types_and_truncate(tokenizer):
    examples = [{"text": "great movie", "text_pair": "the plot is boring", "label": "pos"}]
    (f,) = encode(tokenizer, examples, "seq_cls", ["neg", "pos"], max_length=32)
    assert f["labels"] == 1
    assert tokenizer.convert_ids_to_tokens(f["input_ids"]) == ["[CLS]", "great", "movie", "[SEP]", "the", "plot",
                                                                "is", "boring", "[SEP]"]
    assert f["token_type_ids"] == [0] * 4 + [1] * 5
    (short,) = encode(tokenizer, examples, "seq_cls", ["neg", "pos"], max_length=6)
    assert len(short["input_ids"]) == 6


def test_only_the_first_sub_token_of_a_word_is_labelled_and_predictions_map_back(tokenizer):
    examples = [{"tokens": ["alice", "visited", "xyz", "paris"], "tags": ["B-PER", "O", "B-MISC", "B-LOC"]}]
    labels = ["O", "B-LOC", "B-MISC", "B-PER"]
    (f,) = encode(tokenizer, examples, "token_cls", labels, max_length=32)
    assert tokenizer.convert_ids_to_tokens(f["input_ids"]) == ["[CLS]", "alice", "visited", "x", "##y", "##z",
                                                                "paris", "[SEP]"]
    assert f["labels"] == [-100, 3, 0, 2, -100, -100, 1, -100]
    assert f["word_ids"] == [-1, 0, 1, 2, 2, 2, 3, -1]
    predicted_ids = [[0, 3, 0, 2, 1, 1, 1, 0]]  # sub-token predictions after the first are ignored
    assert word_predictions([f], predicted_ids, labels, examples) == [examples[0]["tags"]]
    (cut,) = encode(tokenizer, examples, "token_cls", labels, max_length=4)  # [CLS] alice visited [SEP]
    assert word_predictions([cut], [[0, 3, 0, 0]], labels, examples) == [["B-PER", "O", "O", "O"]]
