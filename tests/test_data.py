"""Tests for ptuning.data with tiny character-level tokenizers built locally (no network)."""

from __future__ import annotations

import csv
import json

import datasets
import pytest
import torch

from ptuning.data import (
    Collator,
    ColumnSpec,
    build_dataset,
    encode_example,
    encode_prompt,
    load_rows,
    render_prompt,
    to_messages,
    validate_rows,
)
from ptuning.errors import UserError
from tiny_models import CHATML, make_tokenizer

# Like Qwen3: only the final assistant turn gets an (empty) think block, so history is not a string prefix.
THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MSG = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
ROWS = [{"prompt": "hi", "response": "yo"}, {"prompt": "a,b", "response": 'say "x"\nok'}]


@pytest.fixture(scope="module")
def plain():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chatml():
    return make_tokenizer(CHATML)


def user(text):
    return {"role": "user", "content": text, "loss": False}


def bot(text, loss=True):
    return {"role": "assistant", "content": text, "loss": loss}


def trained_text(tokenizer, example):
    return tokenizer.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != -100])


def trained_spans(example):
    """(start, end) of each run of trained positions."""
    spans, start = [], None
    for i, label in enumerate(example["labels"] + [-100]):
        if label != -100 and start is None:
            start = i
        if label == -100 and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ---------------------------------------------------------------- loading


def write_json(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n\n", encoding="utf-8")


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def write_saved(path, rows):
    datasets.Dataset.from_list(rows).save_to_disk(str(path))


def write_saved_dict(path, rows):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))


@pytest.mark.parametrize("name, writer", [
    ("train.json", write_json), ("train.jsonl", write_jsonl), ("train.json.as_lines.json", write_jsonl),
    ("train.csv", write_csv), ("train.parquet", write_parquet),
    ("saved", write_saved), ("saved_dict", write_saved_dict),
])
def test_every_format_loads_the_same_rows(tmp_path, name, writer):
    writer(tmp_path / name, ROWS)
    assert load_rows(str(tmp_path / name)) == ROWS


def test_single_pretty_printed_object_is_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(ROWS[0], indent=2), encoding="utf-8")
    assert load_rows(str(path)) == [ROWS[0]]


def test_csv_cells_may_hold_json_history_and_messages(tmp_path):
    path = tmp_path / "nested.csv"
    write_csv(path, [{"prompt": "q2", "response": "a2", "history": json.dumps([["q1", "a1"]])}])
    rows = load_rows(str(path))
    assert validate_rows(rows, ColumnSpec(), str(path)) == [[user("q1"), bot("a1", loss=False), user("q2"), bot("a2")]]
    path = tmp_path / "messages.csv"
    write_csv(path, [{"messages": json.dumps(MSG)}])
    assert validate_rows(load_rows(str(path)), ColumnSpec(), str(path)) == [[user("q"), bot("a")]]


# ---------------------------------------------------------------- row layouts


def test_layouts_normalise_to_the_same_messages():
    expected = [{"role": "system", "content": "be brief", "loss": False}, user("q"), bot("a")]
    openai = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]}
    sharegpt = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a"}]}
    chatglm = {"prompt": "q", "response": "a", "system": "be brief", "history": None}
    custom = {"question": "q", "answer": "a", "sys": "be brief"}
    columns = ColumnSpec(prompt_column="question", response_column="answer", system_column="sys")
    for row, spec in [(openai, ColumnSpec()), (sharegpt, ColumnSpec()), (chatglm, ColumnSpec()), (custom, columns)]:
        assert to_messages(row, spec, "f: row 1") == expected


def test_alpaca_appends_input_to_instruction():
    row = {"instruction": "Translate", "input": "hola", "output": "hello"}
    assert to_messages(row, ColumnSpec(), "f: row 1") == [user("Translate\nhola"), bot("hello")]
    row = {"instruction": "Say hi", "input": "", "output": "hi"}
    assert to_messages(row, ColumnSpec(), "f: row 1") == [user("Say hi"), bot("hi")]


def test_history_pairs_become_untrained_turns():
    row = {"prompt": "q3", "response": "a3", "history": [["q1", "a1"], ["q2", "a2"]]}
    assert to_messages(row, ColumnSpec(history_column="history"), "f: row 1") == [
        user("q1"), bot("a1", loss=False), user("q2"), bot("a2", loss=False), user("q3"), bot("a3")]


def test_message_loss_flag_is_respected():
    row = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "loss": False},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "loss": None}]}
    assert to_messages(row, ColumnSpec(), "f: row 1") == [user("q1"), bot("a1", loss=False), user("q2"), bot("a2")]


# ---------------------------------------------------------------- rendering


def test_chatglm_template_text_with_system_and_history(plain):
    messages = [{"role": "system", "content": "be brief", "loss": False},
                user("你好"), bot("hi", loss=False), user("q2"), bot("a2"), user("世界")]
    assert render_prompt(plain, messages) == (
        "be brief\n\n[Round 0]\n\n问：你好\n\n答：hi\n\n"
        "[Round 1]\n\n问：q2\n\n答：a2\n\n"
        "[Round 2]\n\n问：世界\n\n答：")
    assert render_prompt(plain, [user("q")]) == "[Round 0]\n\n问：q\n\n答："


def test_chat_template_is_used_when_present(chatml):
    assert render_prompt(chatml, [user("q")]) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


def test_render_prompt_needs_a_final_user_turn(plain):
    with pytest.raises(ValueError, match="end with a user turn"):
        render_prompt(plain, [user("q"), bot("a")])


# ---------------------------------------------------------------- encoding


def test_builtin_template_labels_only_the_reply_plus_eos(plain):
    messages = to_messages({"prompt": "q2", "response": "a2", "history": [["q1", "a1"]]}, ColumnSpec(), "f: row 1")
    example = encode_example(plain, messages, 512, 512)
    assert len(example["input_ids"]) == len(example["labels"])
    assert plain.decode(example["input_ids"]) == (
        "<s>[Round 0]\n\n问：q1\n\n答：a1</s>\n\n[Round 1]\n\n问：q2\n\n答：a2</s>")
    assert example["input_ids"][0] == plain.bos_token_id
    assert trained_text(plain, example) == "a2</s>"
    assert trained_spans(example) == [(len(example["labels"]) - 3, len(example["labels"]))]
    assert example["labels"][-3:] == example["input_ids"][-3:]


def test_chat_template_trains_its_end_marker(chatml):
    example = encode_example(chatml, [user("q"), bot("answer")], 512, 512)
    assert chatml.decode(example["input_ids"]) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nanswer<|im_end|>\n")
    assert trained_text(chatml, example) == "answer<|im_end|>\n"
    assert chatml.bos_token_id is None and example["input_ids"][0] == chatml.convert_tokens_to_ids("<|im_start|>")


def test_eos_is_appended_when_the_template_marker_is_not_eos():
    tokenizer = make_tokenizer(CHATML)
    tokenizer.eos_token = "</s>"
    example = encode_example(tokenizer, [user("q"), bot("answer")], 512, 512)
    assert trained_text(tokenizer, example) == "answer<|im_end|>\n</s>"


def test_multi_turn_with_untrained_turn(chatml):
    messages = [{"role": "system", "content": "s", "loss": False}, user("q1"), bot("a1", loss=False),
                user("q2"), bot("a2"), user("q3"), bot("a3")]
    example = encode_example(chatml, messages, 512, 512)
    full = chatml.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False)
    assert chatml.decode(example["input_ids"]) == full
    spans = trained_spans(example)
    assert [chatml.decode(example["input_ids"][a:b]) for a, b in spans] == ["a2<|im_end|>\n", "a3<|im_end|>\n"]
    assert all(example["labels"][i] == example["input_ids"][i] for a, b in spans for i in range(a, b))
    assert encode_prompt(chatml, messages, 512) == example["input_ids"][: spans[-1][0]]
    assert encode_prompt(chatml, messages[:-1], 512) == example["input_ids"][: spans[-1][0]]


def test_trailing_untrained_reply_is_dropped(chatml):
    example = encode_example(chatml, [user("q1"), bot("a1"), user("q2"), bot("a2", loss=False)], 512, 512)
    assert chatml.decode(example["input_ids"]).endswith("a1<|im_end|>\n")
    assert trained_text(chatml, example) == "a1<|im_end|>\n"


def test_template_that_rewrites_history_falls_back_to_the_lone_turn():
    tokenizer = make_tokenizer(THINKING)
    example = encode_example(tokenizer, [user("q1"), bot("a1"), user("q2"), bot("a2")], 512, 512)
    assert tokenizer.decode(example["input_ids"]) == (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\na2<|im_end|>\n")
    spans = trained_spans(example)
    assert [tokenizer.decode(example["input_ids"][a:b]) for a, b in spans] == [
        "<think>\n\n</think>\n\na1<|im_end|>\n", "<think>\n\n</think>\n\na2<|im_end|>\n"]


def test_truncation_keeps_prompt_end_and_bos_and_caps_target(plain):
    messages = [user("x" * 50 + "TAIL"), bot("abcdefghij")]
    example = encode_example(plain, messages, max_source_length=12, max_target_length=4)
    source = example["input_ids"][:-4]
    assert len(source) == 12
    assert source[0] == plain.bos_token_id
    assert plain.decode(source[1:]) == "xxxTAIL\n\n答："
    assert trained_text(plain, example) == "abcd"
    assert example["labels"][:-4] == [-100] * 12
    assert encode_prompt(plain, messages, 12) == source


def test_truncation_counts_only_untrained_tokens_as_source(chatml):
    messages = [user("q1"), bot("a1"), user("q2"), bot("a2")]
    full = encode_example(chatml, messages, 512, 512)
    cut = encode_example(chatml, messages, max_source_length=30, max_target_length=512)
    untrained = [i for i, label in zip(cut["input_ids"], cut["labels"]) if label == -100]
    assert len(untrained) == 30
    assert cut["input_ids"] == full["input_ids"][-len(cut["input_ids"]):]
    assert chatml.decode(cut["input_ids"]).endswith("<|im_start|>assistant\na2<|im_end|>\n")


def test_encode_prompt_matches_training_context(plain):
    messages = [user("q1"), bot("a1", loss=False), user("q2"), bot("a2")]
    example = encode_example(plain, messages, 512, 512)
    assert encode_prompt(plain, messages, 512) == example["input_ids"][:-3]
    assert plain.decode(encode_prompt(plain, [user("q")], 512)) == "<s>[Round 0]\n\n问：q\n\n答："


def test_lengths_must_be_positive(plain):
    with pytest.raises(UserError, match="max_source_length"):
        encode_example(plain, [user("q"), bot("a")], 0, 8)


# ---------------------------------------------------------------- batching


def test_collator_pads_right_for_training():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                      {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    # the first token of a row is never a target (nothing precedes it), so the label count is the loss's token count
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_num_items_in_batch_counts_exactly_the_tokens_the_loss_sees():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
                                      {"input_ids": [8, 9], "labels": [-100, 9]}])
    labels = batch["labels"]
    assert (labels != -100).sum() == (labels[:, 1:] != -100).sum() == 3


def test_collator_pads_left_for_generation_to_a_multiple():
    batch = Collator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(
        [{"input_ids": torch.tensor([5, 6, 7, 9, 9])}, {"input_ids": [8]}])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[0, 0, 0, 5, 6, 7, 9, 9], [0, 0, 0, 0, 0, 0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1]]


def test_collator_rejects_unknown_side():
    with pytest.raises(ValueError):
        Collator(pad_token_id=0, padding_side="middle")


# ---------------------------------------------------------------- dataset


def test_build_dataset(tmp_path, chatml):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, ROWS)
    dataset = build_dataset(str(path), chatml, ColumnSpec(), 64, 64)
    assert dataset.column_names == ["input_ids", "labels", "length"]
    assert dataset["length"] == [len(ids) for ids in dataset["input_ids"]]
    assert trained_text(chatml, dataset[1]) == 'say "x"\nok<|im_end|>\n'
    assert dataset[0]["input_ids"] == encode_example(chatml, [user("hi"), bot("yo")], 64, 64)["input_ids"]


def test_build_dataset_reports_the_bad_row_before_tokenizing(tmp_path, chatml):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, ROWS + [{"prompt": "q", "response": "  "}])
    with pytest.raises(UserError, match=r"train\.jsonl: row 3: field 'response'"):
        build_dataset(str(path), chatml, ColumnSpec(), 64, 64)


def test_build_dataset_rejects_rows_with_nothing_to_train(tmp_path, chatml, monkeypatch):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, ROWS)
    monkeypatch.setattr("ptuning.data.validate_rows", lambda rows, columns, path: [[user("q"), bot("a", loss=False)]])
    with pytest.raises(UserError, match=r"train\.jsonl: row 1: no trained tokens"):
        build_dataset(str(path), chatml, ColumnSpec(), 64, 64)


# ---------------------------------------------------------------- bad input corpus

GOOD_ROW = {"messages": MSG, "question": "q", "a": "a", "system": "s"}  # valid under every ColumnSpec below
BAD_ROWS = [
    ({"prompt": "q"}, ColumnSpec(), "field 'response': missing column (row has: prompt)"),
    ({"q": "x", "a": "y"}, ColumnSpec(prompt_column="question", response_column="a"),
     "field 'question': missing column"),
    ({"prompt": "q", "response": "a"}, ColumnSpec(history_column="hist"), "field 'hist': missing column"),
    ({"text": "hello"}, ColumnSpec(), "no 'messages', 'conversations', 'prompt'/'response'"),
    ({"prompt": 7, "response": "a"}, ColumnSpec(), "field 'prompt': expected a string, got 7"),
    ({"prompt": ["q"], "response": "a"}, ColumnSpec(), "field 'prompt': expected a string, got ['q']"),
    ({"prompt": "q", "response": 3.5}, ColumnSpec(), "field 'response': expected a non-empty string, got 3.5"),
    ({"prompt": "q", "response": ""}, ColumnSpec(), "field 'response': expected a non-empty string, got ''"),
    ({"instruction": "q", "output": " \n"}, ColumnSpec(), "field 'output': expected a non-empty string"),
    ({"instruction": "q", "input": 1, "output": "a"}, ColumnSpec(), "field 'input': expected a string, got 1"),
    ({"prompt": "q", "response": "a", "system": 1}, ColumnSpec(), "field 'system': expected a string, got 1"),
    ({"prompt": "q", "response": "a", "history": [["q0"]]}, ColumnSpec(),
     "field 'history[0]': expected a [prompt, response] pair of strings, got ['q0']"),
    ({"prompt": "q", "response": "a", "history": [["q0", 1]]}, ColumnSpec(), "field 'history[0]'"),
    ({"prompt": "q", "response": "a", "history": "q0 a0"}, ColumnSpec(), "field 'history': expected a list"),
    ({"messages": "hi"}, ColumnSpec(), "field 'messages': expected a non-empty list of messages, got 'hi'"),
    ({"messages": []}, ColumnSpec(), "field 'messages': expected a non-empty list"),
    ({"messages": ["hi"]}, ColumnSpec(), "field 'messages[0]': expected an object with 'role' and 'content'"),
    ({"messages": [MSG[0], {"role": "bot", "content": "a"}]}, ColumnSpec(),
     "field 'messages[1].role': unknown role 'bot'"),
    ({"messages": [{"role": ["user"], "content": "q"}, MSG[1]]}, ColumnSpec(),
     "field 'messages[0].role': unknown role ['user']"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "chatgpt", "value": "a"}]}, ColumnSpec(),
     "field 'conversations[1].from': unknown role 'chatgpt'"),
    ({"messages": [{"role": "system", "content": "s"}, MSG[0]]}, ColumnSpec(), "field 'messages': no assistant turn"),
    ({"messages": MSG + [MSG[0]]}, ColumnSpec(), "field 'messages': the last turn must be from the assistant"),
    ({"messages": [MSG[0], MSG[0], MSG[1]]}, ColumnSpec(), "field 'messages[1].role': expected 'assistant' here"),
    ({"messages": [MSG[0], {"role": "system", "content": "s"}, MSG[1]]}, ColumnSpec(),
     "field 'messages[1].role': a system message is only allowed as the first message"),
    ({"messages": [MSG[0], {"role": "assistant", "content": ""}]}, ColumnSpec(),
     "field 'messages[1].content': expected a non-empty string, got ''"),
    ({"messages": [{"role": "user", "content": None}, MSG[1]]}, ColumnSpec(),
     "field 'messages[0].content': expected a string, got None"),
    ({"messages": [MSG[0], {**MSG[1], "loss": "no"}]}, ColumnSpec(),
     "field 'messages[1].loss': expected true or false"),
    ({"messages": [{**MSG[0], "loss": True}, MSG[1]]}, ColumnSpec(), "field 'messages[0].loss': only assistant turns"),
    ({"messages": [MSG[0], {**MSG[1], "loss": False}]}, ColumnSpec(),
     "field 'messages': every assistant turn has loss false"),
    ({"messages": MSG, "sys": "s"}, ColumnSpec(messages_column="messages", system_column="system"),
     "field 'system': missing column"),
]


@pytest.mark.parametrize("bad, columns, expected", BAD_ROWS)
def test_bad_row_names_file_row_and_field(tmp_path, bad, columns, expected):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [GOOD_ROW, bad])
    rows = load_rows(str(path))
    with pytest.raises(UserError) as info:
        validate_rows(rows, columns, str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: row 2: ")
    assert expected in message
    assert "\n" not in message


def bad_file(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


BAD_FILES = [
    ("train.jsonl", b'{"prompt": "q", "response": "a"}\n\n{"prompt": "q", response: 1}\n', "line 3: not valid JSON ("),
    ("train.json", b'[\n  {"prompt": "q", "response": "a"},\n  {"prompt": }\n]',
     "line 3: not valid JSON (Expecting value)"),
    ("train.jsonl", b'{"prompt": "q", "response": "a"}\n[1, 2]\n', "line 2: expected a JSON object, got [1, 2]"),
    ("train.json", b'["q", "a"]', "row 1: expected a JSON object, got 'q'"),
    ("train.txt", b"prompt\tresponse\n", "unknown file type '.txt'"),
    ("train", b"prompt", "unknown file type (no extension)"),
    ("train.jsonl", b"", "empty file"),
    ("train.json", b"  \n\n", "empty file"),
    ("train.csv", b"", "empty file"),
    ("train.csv", b"prompt,response\n", "no rows (only a header line)"),
    ("train.json", b"[]", "no rows"),
    ("train.jsonl", b'{"prompt": "q", "response": "a"}\n{"prompt": "caf\xe9", "response": "a"}\n',
     "line 2: not valid UTF-8 (byte 0xe9)"),
    ("train.csv", b"prompt,response\nq,a\nq,\xff\xfe\n", "line 3: not valid UTF-8 (byte 0xff)"),
    ("train.parquet", b"not parquet at all", "could not read as parquet ("),
]


@pytest.mark.parametrize("name, content, expected", BAD_FILES)
def test_bad_file_names_file_and_line(tmp_path, name, content, expected):
    path = bad_file(tmp_path, name, content)
    with pytest.raises(UserError) as info:
        load_rows(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_missing_file_and_non_dataset_directory(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: file not found$"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match=r"folder: not a dataset saved with save_to_disk"):
        load_rows(str(tmp_path / "folder"))
