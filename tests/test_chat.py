"""Chat: the Python API keeps ChatGLM-style history; the CLI streams replies and keeps it across turns."""

import io
import json

import pytest
import torch

import main
import ptuning
from ptuning.chat import build_messages, chat_loop, run_chat, stream_chat
from ptuning.export import save_prefix
from ptuning.infer import generate_replies
from ptuning.model import attach_prefix, load_base_model
from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model_dir = save_tiny_checkpoint(root / "model")
    base, _ = load_base_model(model_dir)
    model = attach_prefix(base, 4)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.prefix_encoder.embedding.weight, std=0.5)
    save_prefix(model, str(root / "prefix"))
    return model_dir, str(root / "prefix")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return ptuning.load(*checkpoint)


def reference_reply(model, tokenizer, query, history, system=None):
    """The reply of the non-streaming batched path for the same conversation."""
    return generate_replies(model, tokenizer, [build_messages(query, history, system)], max_source_length=2048,
                            max_new_tokens=8)[0]


def test_api_two_turns_keep_history(loaded):
    model, tokenizer = loaded
    reply1, history = ptuning.chat(model, tokenizer, "hi", max_new_tokens=8)
    assert history == [("hi", reply1)] and reply1 == reference_reply(model, tokenizer, "hi", [])
    before = list(history)
    reply2, history2 = ptuning.chat(model, tokenizer, "and then?", history, max_new_tokens=8)
    assert history == before  # the caller's list is not modified
    assert history2 == [("hi", reply1), ("and then?", reply2)]
    assert reply2 == reference_reply(model, tokenizer, "and then?", history)
    assert reply2 != reference_reply(model, tokenizer, "and then?", [])  # the history reaches the prompt


def test_stream_yields_growing_text_ending_with_the_reply(loaded):
    model, tokenizer = loaded
    items = list(stream_chat(model, tokenizer, "hello there", system="be brief", max_new_tokens=8))
    texts = [t for t, _ in items]
    assert len(items) >= 2 and all(b.startswith(a) for a, b in zip(texts[:-2], texts[1:-1]))
    assert texts[-1] == texts[-2].strip() == reference_reply(model, tokenizer, "hello there", [], "be brief")
    assert items[-1][1] == [("hello there", texts[-1])]


def test_cli_two_turns_through_stdin_writes_the_history(checkpoint, loaded, tmp_path, monkeypatch, capsys):
    model, tokenizer = loaded
    model_dir, prefix = checkpoint
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nand then?\nexit\nnot read\n"))
    history_file = tmp_path / "chats.jsonl"
    assert main.main(["chat", "--model_name_or_path", model_dir, "--ptuning_checkpoint", prefix,
                      "--max_new_tokens", "8", "--max_source_length", "2048",
                      "--history_file", str(history_file)]) == 0
    reply1 = reference_reply(model, tokenizer, "hi", [])
    reply2 = reference_reply(model, tokenizer, "and then?", [("hi", reply1)])
    rows = [json.loads(line) for line in history_file.read_text().splitlines()]
    assert rows == [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply1},
                                  {"role": "user", "content": "and then?"},
                                  {"role": "assistant", "content": reply2}]}]
    out = capsys.readouterr().out
    assert out.count("User: ") == 4  # prompts for: hi, the blank line, and then?, exit
    streamed = [part.split("\n")[0].strip() for part in out.split("Assistant: ")[1:]]
    assert streamed == [reply1, reply2]


def test_clear_starts_a_new_conversation_and_end_of_input_stops(checkpoint, loaded, tmp_path):
    model, tokenizer = loaded
    model_dir, prefix = checkpoint
    output = io.StringIO()
    history_file = tmp_path / "chats.jsonl"
    history = run_chat(["--model_name_or_path", model_dir, "--ptuning_checkpoint", prefix, "--max_new_tokens", "8",
                        "--max_source_length", "2048", "--history_file", str(history_file)],
                       io.StringIO("hi\nclear\nhello\n"), output)
    reply = reference_reply(model, tokenizer, "hello", [])
    assert history == [("hello", reply)]
    assert "(history cleared)" in output.getvalue()
    rows = [json.loads(line) for line in history_file.read_text().splitlines()]
    assert [len(r["messages"]) for r in rows] == [2, 2]
    assert rows[1]["messages"][1]["content"] == reply


def test_generation_errors_reach_the_caller_instead_of_hanging(loaded):
    model, tokenizer = loaded

    class Broken(torch.nn.Module):
        device = torch.device("cpu")

        def generate(self, *args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        chat_loop(Broken(), tokenizer, io.StringIO("hi\n"), io.StringIO())


def test_chat_is_callable_as_ptuning_chat_after_importing_the_module(loaded):
    import ptuning.chat as chat_module

    model, tokenizer = loaded
    assert callable(ptuning.chat) and callable(chat_module)
    assert chat_module(model, tokenizer, "hi", max_new_tokens=8) == ptuning.chat(model, tokenizer, "hi",
                                                                                 max_new_tokens=8)


def test_chat_needs_a_checkpoint(checkpoint, capsys):
    assert main.main(["chat", "--model_name_or_path", checkpoint[0]]) == 2
    assert "--ptuning_checkpoint is required" in capsys.readouterr().err
