"""Multi-turn chat with a prefix-tuned model: a Python API and a streaming terminal loop.

    import ptuning
    model, tokenizer = ptuning.load("BASE", "output/my-prefix")
    reply, history = ptuning.chat(model, tokenizer, "Hello")
    reply, history = ptuning.chat(model, tokenizer, "And then?", history)

``history`` is a list of ``(query, reply)`` pairs (ChatGLM's convention); prompts are rendered with the tokenizer's
chat template (ChatGLM's round format when it has none) exactly as training renders them, keeping the newest
``max_source_length`` tokens. Decoding is greedy unless ``do_sample=True``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from collections.abc import Iterator

import torch

from .data import encode_prompt
from .errors import UserError
from .infer import generate_ids, generation_kwargs, generation_options

EXIT_COMMANDS = ("exit", "quit", "stop")
CLEAR_COMMAND = "clear"


def build_messages(query: str, history=None, system: str | None = None) -> list[dict]:
    """System message (optional), the earlier turns, then the new query, in ``ptuning.data``'s message shape."""
    def turn(role, content):
        return {"role": role, "content": content, "loss": False}

    messages = [turn("system", system)] if system else []
    for user, assistant in history or []:
        messages += [turn("user", user), turn("assistant", assistant)]
    return messages + [turn("user", query)]


def stream_chat(model, tokenizer, query: str, history=None, *, system: str | None = None,
                max_source_length: int = 2048, max_new_tokens: int = 512, **gen) -> Iterator[tuple[str, list]]:
    """Yield ``(reply so far, history with it)`` while tokens arrive; the last item holds the final reply.

    ``model.generate`` runs in a thread feeding a ``TextIteratorStreamer``; an error there is re-raised here.
    """
    from transformers import TextIteratorStreamer

    history = [tuple(turn) for turn in history or []]
    ids = encode_prompt(tokenizer, build_messages(query, history, system), max_source_length)
    input_ids = torch.tensor([ids], device=model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}

    def generate():
        try:
            result["output"] = generate_ids(model, input_ids, torch.ones_like(input_ids), streamer=streamer,
                                            **generation_kwargs(tokenizer, max_new_tokens, **gen))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e
            streamer.end()

    was_training = model.training
    model.eval()
    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    try:
        text = ""
        for piece in streamer:
            text += piece
            yield text, history + [(query, text)]
    finally:
        worker.join()
        model.train(was_training)
    if "error" in result:
        raise result["error"]
    reply = tokenizer.decode(result["output"][0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    yield reply, history + [(query, reply)]


def chat(model, tokenizer, query: str, history=None, *, system: str | None = None, max_source_length: int = 2048,
         max_new_tokens: int = 512, **gen) -> tuple[str, list]:
    """One turn: ``(reply, history + [(query, reply)])``; the caller's ``history`` is not modified."""
    reply, new_history = "", list(history or [])
    for reply, new_history in stream_chat(model, tokenizer, query, history, system=system,
                                          max_source_length=max_source_length, max_new_tokens=max_new_tokens, **gen):
        pass
    return reply, new_history


def history_messages(history, system: str | None = None) -> dict:
    """A conversation as a training row: ``{"messages": [...]}``, loadable with ``--train_file``."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def _save_conversations(path: str, conversations: list[dict]) -> None:
    """Rewrite the whole file atomically, one conversation per line."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for conversation in conversations:
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def chat_loop(model, tokenizer, input_stream=None, output=None, *, system: str | None = None,
              history_file: str | None = None, max_source_length: int = 2048, max_new_tokens: int = 512,
              **gen) -> list:
    """Read queries line by line, stream each reply; ``clear`` starts over, ``exit`` (or end of input) stops.

    Returns the history of the conversation in progress. With ``history_file``, every conversation of the session
    is (re)written there after each turn as one ``{"messages": [...]}`` line.
    """
    input_stream = input_stream or sys.stdin
    output = output or sys.stdout
    conversations: list[dict] = []
    history: list = []
    output.write(f"Type a message. '{CLEAR_COMMAND}' starts a new conversation, '{EXIT_COMMANDS[0]}' quits.\n")
    while True:
        output.write("\nUser: ")
        output.flush()
        line = input_stream.readline()
        if not line:
            output.write("\n")
            break
        query = line.strip()
        if not query:
            continue
        if query.lower() in EXIT_COMMANDS:
            break
        if query.lower() == CLEAR_COMMAND:
            history = []
            output.write("(history cleared)\n")
            continue
        output.write("Assistant: ")
        printed = ""
        for text, new_history in stream_chat(model, tokenizer, query, history, system=system,
                                             max_source_length=max_source_length, max_new_tokens=max_new_tokens,
                                             **gen):
            if text.startswith(printed):
                output.write(text[len(printed):])
                output.flush()
                printed = text
            history = new_history
        output.write("\n")
        if history_file:
            if len(history) == 1:
                conversations.append({})
            conversations[-1] = history_messages(history, system)
            _save_conversations(history_file, conversations)
    return history


def run_chat(argv: list[str], input_stream=None, output=None) -> list:
    """``python main.py chat --model_name_or_path BASE --ptuning_checkpoint DIR [generation flags]``."""
    import ptuning

    from .args import parse_args
    from .validate import validate_inference

    model_args, _, data_args, training_args = parse_args(argv)
    if not model_args.model_name_or_path:
        raise UserError("chat: --model_name_or_path is required")
    if not model_args.ptuning_checkpoint:
        raise UserError("chat: --ptuning_checkpoint is required (the prefix to chat with)")
    if (training_args.generation_num_beams or 1) > 1:
        raise UserError("chat: streaming works with one beam; drop --generation_num_beams")
    validate_inference(model_args, training_args)  # before any weights are loaded
    model, tokenizer = ptuning.load_from_args(model_args)
    if data_args.do_sample:
        from transformers import set_seed

        set_seed(training_args.seed)
    return chat_loop(model, tokenizer, input_stream, output, system=data_args.system_prompt,
                     history_file=data_args.history_file, max_source_length=data_args.max_source_length,
                     max_new_tokens=data_args.max_new_tokens, **generation_options(data_args))


class _CallableModule(types.ModuleType):
    """``ptuning.chat(...)`` works whether the name resolves to this module or to its ``chat`` function."""

    def __call__(self, *args, **kwargs):
        return chat(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
