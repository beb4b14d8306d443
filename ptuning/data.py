"""Load, validate, render and tokenize chat fine-tuning data, reporting bad rows before any model is loaded."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass

import datasets
import torch

from .errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
JSON_SUFFIXES = (".json", ".jsonl")
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet"}


@dataclass
class ColumnSpec:
    """Which row fields hold the conversation; None everywhere means detect it from each row's keys."""

    prompt_column: str | None = None
    response_column: str | None = None
    history_column: str | None = None
    messages_column: str | None = None
    system_column: str | None = None


# ---------------------------------------------------------------- loading


def load_rows(path: str) -> list[dict]:
    """Read every row of a data file into memory so each can be checked before training starts."""
    path = str(path)
    if os.path.isdir(path):
        rows = _read_saved_dataset(path)
    elif not os.path.exists(path):
        raise UserError(f"{path}: file not found")
    else:
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in JSON_SUFFIXES and suffix not in TABLE_SUFFIXES:
            kind = f"'{suffix}'" if suffix else "(no extension)"
            raise UserError(f"{path}: unknown file type {kind} "
                            "(expected .json, .jsonl, .csv, .parquet or a save_to_disk directory)")
        if os.path.getsize(path) == 0:
            raise UserError(f"{path}: empty file")
        rows = _read_json(path) if suffix in JSON_SUFFIXES else _read_table(path, TABLE_SUFFIXES[suffix])
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _read_text(path: str) -> str:
    """Decode the whole file up front so bad bytes are reported by line rather than as a parser crash."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                        "save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: empty file")
    return text


def _read_json(path: str) -> list[dict]:
    """Accept a JSON array, a single object, or JSON lines, naming the broken line when parsing fails."""
    text = _read_text(path)
    start = text.lstrip()[0]
    if start in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if start == "[":
                raise UserError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        else:
            rows = data if isinstance(data, list) else [data]
            return [_require_object(row, f"{path}: row {i}") for i, row in enumerate(rows, 1)]
    return _read_json_lines(path, text)


def _read_json_lines(path: str, text: str) -> list[dict]:
    """One object per line; blank lines are skipped so a trailing newline is harmless."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
        rows.append(_require_object(row, f"{path}: line {number}"))
    return rows


def _require_object(row, where: str) -> dict:
    """Rows must be objects so fields can be looked up by name."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {_describe(row)}")
    return row


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or log lines from `datasets` while reading: a failure is reported once, as our own line."""
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.utils.enable_progress_bars()


def _read_table(path: str, kind: str) -> list[dict]:
    """Parse csv/parquet with `datasets` in a throwaway cache, so an edited file is never served stale."""
    if kind == "csv" and len([line for line in _read_text(path).splitlines() if line.strip()]) < 2:
        raise UserError(f"{path}: no rows (only a header line)")
    with tempfile.TemporaryDirectory() as cache_dir, _quiet_datasets():
        try:
            dataset = datasets.load_dataset(kind, data_files=path, split="train", cache_dir=cache_dir)
        except Exception as e:
            raise UserError(f"{path}: could not read as {kind} ({_first_line(e)})") from None
        return dataset.to_list()


def _read_saved_dataset(path: str) -> list[dict]:
    """Read a save_to_disk directory; a DatasetDict must make clear which split is meant."""
    try:
        with _quiet_datasets():
            dataset = datasets.load_from_disk(path)
    except Exception as e:
        raise UserError(f"{path}: not a dataset saved with save_to_disk ({_first_line(e)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" in dataset:
            dataset = dataset["train"]
        elif len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            raise UserError(f"{path}: holds splits {sorted(dataset)}; save the one to use on its own")
    return dataset.to_list()


def _first_line(error: Exception) -> str:
    """Library errors can span pages; the first line is enough to act on."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------- validation


def to_messages(row: dict, columns: ColumnSpec, where: str) -> list[dict]:
    """Normalise any supported row layout into one message list, so the rest of the code sees a single format."""
    if columns.messages_column:
        return _from_messages(row, columns.messages_column, columns, where)
    if columns.prompt_column or columns.response_column:
        return _from_pairs(row, columns.prompt_column or "prompt", columns.response_column or "response",
                           columns, where)
    for name in ("messages", "conversations"):
        if name in row:
            return _from_messages(row, name, columns, where)
    if "prompt" in row or "response" in row:
        return _from_pairs(row, "prompt", "response", columns, where)
    if "instruction" in row or "output" in row:
        return _from_alpaca(row, columns, where)
    raise UserError(f"{where}: no 'messages', 'conversations', 'prompt'/'response' or 'instruction'/'output' "
                    f"field (row has: {_keys(row)}); name the columns to use")


def _from_pairs(row: dict, prompt_column: str, response_column: str, columns: ColumnSpec, where: str) -> list[dict]:
    """ChatGLM layout: earlier [prompt, response] pairs are context, only the final response is trained."""
    prompt = _string(row, prompt_column, where)
    response = _reply(row, response_column, where)
    messages = _system(row, columns, where)
    for user, assistant in _history(row, columns, where):
        messages += [_turn("user", user), _turn("assistant", assistant, loss=False)]
    return messages + [_turn("user", prompt), _turn("assistant", response)]


def _from_alpaca(row: dict, columns: ColumnSpec, where: str) -> list[dict]:
    """Alpaca layout: the optional input is appended to the instruction, as in the Alpaca prompt."""
    instruction = _string(row, "instruction", where)
    output = _reply(row, "output", where)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        _fail(where, "input", f"expected a string, got {_describe(extra)}")
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return _system(row, columns, where) + [_turn("user", prompt), _turn("assistant", output)]


def _from_messages(row: dict, column: str, columns: ColumnSpec, where: str) -> list[dict]:
    """OpenAI or ShareGPT layout: a user/assistant alternation, optionally opened by one system message."""
    items = _nested(_field(row, column, where))
    if not isinstance(items, list) or not items:
        _fail(where, column, f"expected a non-empty list of messages, got {_describe(items)}")
    messages = [_message(item, f"{column}[{i}]", where) for i, item in enumerate(items)]
    system = _system(row, columns, where)
    if system and messages[0]["role"] == "system":
        _fail(where, columns.system_column or "system", f"row also has a system message in '{column}'")
    messages = system + messages
    _check_order(messages, column, len(system), where)
    if not any(m["loss"] for m in messages):
        _fail(where, column, "every assistant turn has loss false; nothing to train on")
    return messages


def _message(item, field: str, where: str) -> dict:
    """One chat turn; assistant turns are trained unless they say "loss": false."""
    if not isinstance(item, dict):
        _fail(where, field, f"expected an object with 'role' and 'content', got {_describe(item)}")
    role_key, content_key = ("from", "value") if item.get("role") is None and "from" in item else ("role", "content")
    raw_role = item.get(role_key)
    if not isinstance(raw_role, str) or raw_role not in ROLES:
        _fail(where, f"{field}.{role_key}",
              f"unknown role {raw_role!r} (expected system, user, assistant, or ShareGPT human, gpt)")
    role = ROLES[raw_role]
    content = item.get(content_key)
    if not isinstance(content, str) or (role == "assistant" and not content.strip()):
        kind = "a non-empty string" if role == "assistant" else "a string"
        _fail(where, f"{field}.{content_key}", f"expected {kind}, got {_describe(content)}")
    loss = item.get("loss")
    if loss is not None and not isinstance(loss, bool):
        _fail(where, f"{field}.loss", f"expected true or false, got {_describe(loss)}")
    if loss and role != "assistant":
        _fail(where, f"{field}.loss", f"only assistant turns can be trained, this one is {role!r}")
    return _turn(role, content, loss=loss is not False)


def _check_order(messages: list[dict], column: str, offset: int, where: str) -> None:
    """Templates pair each user turn with the assistant reply after it, so the order must strictly alternate."""
    start = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            field = f"{column}[{i - offset}].role"
            if message["role"] == "system":
                _fail(where, field, "a system message is only allowed as the first message")
            _fail(where, field, f"expected {expected!r} here (turns must alternate user, assistant), "
                                f"got {message['role']!r}")
    if messages[-1]["role"] != "assistant":
        problem = "no assistant turn" if not any(m["role"] == "assistant" for m in messages) else (
            f"the last turn must be from the assistant, got {messages[-1]['role']!r}")
        _fail(where, column, problem)


def _history(row: dict, columns: ColumnSpec, where: str) -> list[tuple[str, str]]:
    """Earlier rounds as [prompt, response] string pairs; a missing or null history means none."""
    column = columns.history_column or "history"
    if columns.history_column:
        _field(row, column, where)
    history = _nested(row.get(column))
    if history is None:
        return []
    if not isinstance(history, list):
        _fail(where, column, f"expected a list of [prompt, response] pairs, got {_describe(history)}")
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            _fail(where, f"{column}[{i}]", f"expected a [prompt, response] pair of strings, got {_describe(pair)}")
    return [tuple(pair) for pair in history]


def _system(row: dict, columns: ColumnSpec, where: str) -> list[dict]:
    """An optional system prompt; an empty or null value means none."""
    column = columns.system_column or "system"
    value = _field(row, column, where) if columns.system_column else row.get(column)
    if value is not None and not isinstance(value, str):
        _fail(where, column, f"expected a string, got {_describe(value)}")
    return [_turn("system", value)] if value else []


def _string(row: dict, column: str, where: str) -> str:
    """A text field that must be present but may be empty."""
    value = _field(row, column, where)
    if not isinstance(value, str):
        _fail(where, column, f"expected a string, got {_describe(value)}")
    return value


def _reply(row: dict, column: str, where: str) -> str:
    """A trained reply: blank text would train the model to say nothing."""
    value = _field(row, column, where)
    if not isinstance(value, str) or not value.strip():
        _fail(where, column, f"expected a non-empty string, got {_describe(value)}")
    return value


def _field(row: dict, column: str, where: str):
    """Look a column up, naming the columns that do exist when it is missing."""
    if column not in row:
        _fail(where, column, f"missing column (row has: {_keys(row)})")
    return row[column]


def _nested(value):
    """CSV cells hold lists as JSON text; decode those so csv files can carry history and messages too."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _turn(role: str, content: str, loss: bool = True) -> dict:
    """The single message shape the rest of the pipeline relies on; only assistant turns can carry loss."""
    return {"role": role, "content": content, "loss": role == "assistant" and loss}


def _fail(where: str, field: str, problem: str):
    """Every validation error has the same one-line shape: where, field, what was wrong."""
    raise UserError(f"{where}: field '{field}': {problem}")


def _describe(value) -> str:
    """Show a bad value briefly: short values verbatim, long ones by type."""
    text = repr(value)
    if isinstance(value, (dict, list, tuple)) and len(text) > 60:
        return f"a {type(value).__name__} of length {len(value)}"
    if isinstance(value, float) and math.isnan(value):
        return "an empty cell (NaN)"
    return text if len(text) <= 60 else text[:57] + "..."


def _keys(row: dict) -> str:
    """The row's field names, to show what a missing column could have been called."""
    return ", ".join(map(str, row)) or "nothing"


def validate_rows(rows: list[dict], columns: ColumnSpec, path: str) -> list[list[dict]]:
    """Check every row up front, so a bad row stops the run before any model is loaded."""
    return [to_messages(row, columns, f"{path}: row {i}") for i, row in enumerate(rows, 1)]


# ---------------------------------------------------------------- rendering


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model sees before its next reply, so training and generation share one prompt format."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("render_prompt needs messages that end with a user turn")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_plain(messages), tokenize=False, add_generation_prompt=True)
    return _chatglm_prompt(messages)


def _chatglm_prompt(messages: list[dict]) -> str:
    """ChatGLM-6B's round format, for tokenizers that ship no chat template."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    users, replies = [m["content"] for m in turns[0::2]], [m["content"] for m in turns[1::2]]
    text = f"{system}\n\n" if system else ""
    for i, (user, reply) in enumerate(zip(users, replies)):
        text += f"[Round {i}]\n\n问：{user}\n\n答：{reply}\n\n"
    return text + f"[Round {len(replies)}]\n\n问：{users[-1]}\n\n答："


def _full_text(tokenizer, messages: list[dict]) -> str:
    """The chat template's rendering of a finished conversation, which closes the last reply with its end marker."""
    return tokenizer.apply_chat_template(_plain(messages), tokenize=False)


def _plain(messages: list[dict]) -> list[dict]:
    """Templates only know role and content."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------- tokenizing


def encode_example(tokenizer, messages: list[dict], max_source_length: int, max_target_length: int) -> dict:
    """Token ids with labels only on trained assistant replies, truncated so the newest context survives."""
    _check_lengths(max_source_length, max_target_length)
    segments = _segments(tokenizer, messages)
    trained = [i for i, (_, is_trained) in enumerate(segments) if is_trained]
    if not trained:
        return {"input_ids": [], "labels": []}
    input_ids, labels = [], []
    for ids, is_trained in segments[: trained[-1] + 1]:
        ids = ids[:max_target_length] if is_trained else ids
        input_ids += ids
        labels += ids if is_trained else [IGNORE_INDEX] * len(ids)
    split = len(input_ids) - len(segments[trained[-1]][0][:max_target_length])
    keep = _keep_recent(input_ids[:split], labels[:split], max_source_length, tokenizer.bos_token_id)
    return {"input_ids": [input_ids[i] for i in keep] + input_ids[split:],
            "labels": [labels[i] for i in keep] + labels[split:]}


def encode_prompt(tokenizer, messages: list[dict], max_source_length: int) -> list[int]:
    """Prompt ids for generation, built and truncated exactly as the context of a training example."""
    _check_lengths(max_source_length, 1)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    input_ids, labels = [], []
    for ids, is_trained in _segments(tokenizer, messages):
        input_ids += ids
        labels += ids if is_trained else [IGNORE_INDEX] * len(ids)
    return [input_ids[i] for i in _keep_recent(input_ids, labels, max_source_length, tokenizer.bos_token_id)]


def _check_lengths(max_source_length: int, max_target_length: int) -> None:
    """Zero or negative limits would silently produce empty examples."""
    if max_source_length < 1 or max_target_length < 1:
        raise UserError(f"max_source_length and max_target_length must be at least 1, "
                        f"got {max_source_length} and {max_target_length}")


def _keep_recent(input_ids: list[int], labels: list[int], budget: int, bos_token_id: int | None) -> list[int]:
    """Indices to keep: drop the oldest context until at most `budget` untrained tokens remain; a leading BOS stays."""
    pinned = [0] if input_ids and bos_token_id is not None and input_ids[0] == bos_token_id else []
    budget -= len(pinned)
    start, untrained = len(input_ids), 0
    while start > len(pinned):
        untrained += labels[start - 1] == IGNORE_INDEX
        if untrained > budget:
            break
        start -= 1
    return pinned + list(range(start, len(input_ids)))


def _segments(tokenizer, messages: list[dict]) -> list[tuple[list[int], bool]]:
    """(ids, trained) pieces in order: each assistant turn's new prompt text, then its reply."""
    segments, emitted = [], ""
    for k, message in enumerate(messages):
        last = k == len(messages) - 1
        if message["role"] != "assistant" and not (last and message["role"] == "user"):
            continue
        prompt_messages = messages[:k] if message["role"] == "assistant" else messages
        prompt = render_prompt(tokenizer, prompt_messages)
        new_text = prompt[len(emitted):] if prompt.startswith(emitted) else _turn_alone(tokenizer, prompt_messages)
        segments.append((_tokenize(tokenizer, new_text, first=not segments), False))
        if message["role"] == "assistant":
            reply_ids, emitted = _reply_ids(tokenizer, messages[: k + 1], prompt)
            segments.append((reply_ids, message["loss"]))
    return segments


def _turn_alone(tokenizer, prompt_messages: list[dict]) -> str:
    """Fallback for templates that re-render history differently (e.g. stripping reasoning): the user turn by itself."""
    return render_prompt(tokenizer, prompt_messages[-1:])


def _reply_ids(tokenizer, messages: list[dict], prompt: str) -> tuple[list[int], str]:
    """A reply's ids and the text emitted so far; trains the template's end-of-turn marker, plus EOS if it differs."""
    if getattr(tokenizer, "chat_template", None):
        full = _full_text(tokenizer, messages)
        if full.startswith(prompt) and len(full) > len(prompt):
            reply = full[len(prompt):]
            eos = [] if tokenizer.eos_token and tokenizer.eos_token in reply else _eos(tokenizer)
            return _tokenize(tokenizer, reply, first=False) + eos, full
    content = messages[-1]["content"]
    return _tokenize(tokenizer, content, first=False) + _eos(tokenizer), prompt + content


def _eos(tokenizer) -> list[int]:
    """Replies must end in a token generation stops at, or the model never learns to stop."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token, so replies cannot be terminated; set one")
    return [tokenizer.eos_token_id]


def _tokenize(tokenizer, text: str, first: bool) -> list[int]:
    """Only the very first piece gets special tokens (BOS), and not when the template already wrote one."""
    bos = tokenizer.bos_token
    add_special = first and not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"] if text else []


# ---------------------------------------------------------------- batching


@dataclass
class Collator:
    """Pad each batch only to its own longest example (right for training, left for generation) to save compute."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": [self._pad(f["input_ids"], self.pad_token_id, length) for f in features],
            "attention_mask": [self._pad([1] * len(f["input_ids"]), 0, length) for f in features],
        }
        if "labels" in features[0]:
            batch["labels"] = [self._pad(f["labels"], IGNORE_INDEX, length) for f in features]
            for labels, mask in zip(batch["labels"], batch["attention_mask"]):
                if 1 in mask:  # a row's first token has nothing before it: never a target, so the Trainer's
                    labels[mask.index(1)] = IGNORE_INDEX  # token count (num_items_in_batch) matches the loss's
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}

    def _pad(self, values, fill: int, length: int) -> list[int]:
        values = list(values.tolist() if isinstance(values, torch.Tensor) else values)
        padding = [fill] * (length - len(values))
        return values + padding if self.padding_side == "right" else padding + values


# ---------------------------------------------------------------- dataset


def build_dataset(path: str, tokenizer, columns: ColumnSpec, max_source_length: int,
                  max_target_length: int) -> datasets.Dataset:
    """Validated, tokenized training data with a length column for length-grouped sampling."""
    return encode_dataset(validate_rows(load_rows(path), columns, path), path, tokenizer, max_source_length,
                          max_target_length)


def encode_dataset(messages: list[list[dict]], path: str, tokenizer, max_source_length: int,
                   max_target_length: int) -> datasets.Dataset:
    """Tokenize already-validated conversations (``path`` only names them in errors)."""
    encoded = {"input_ids": [], "labels": [], "length": []}
    for i, conversation in enumerate(messages, 1):
        example = encode_example(tokenizer, conversation, max_source_length, max_target_length)
        if not any(label != IGNORE_INDEX for label in example["labels"]):
            raise UserError(f"{path}: row {i}: no trained tokens left after tokenizing and truncation")
        encoded["input_ids"].append(example["input_ids"])
        encoded["labels"].append(example["labels"])
        encoded["length"].append(len(example["input_ids"]))
    logger.info("%s: %d examples, longest %d tokens", path, len(messages), max(encoded["length"]))
    return datasets.Dataset.from_dict(encoded)
