"""The OpenAI-compatible server on a loopback port, driven by the official ``openai`` client.

A tiny base and two prefixes (one ChatGLM-style, positions not offset) are saved to disk and served by
``ptuning.server.build`` (the ``serve`` command without binding); every greedy reply must equal
``generate_replies`` for that prefix (or the bare base) alone.
"""

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from ptuning.errors import UserError
from ptuning.export import save_prefix
from ptuning.infer import generate_replies
from ptuning.model import attach_prefix
from ptuning.server import build, run_serve
from ptuning.serving import MultiPrefixModel
from tiny_models import save_tiny_checkpoint

KEY, ADMIN = "test-key", "admin-key"
PREFIXES = {"support": (3, True), "legal": (6, False), "spare": (4, True)}  # spare: added through the admin API
MAX_NEW = 12


class BareBase(torch.nn.Module):
    """The base without any prefix, with generate(ids, mask) like a prefix model, for generate_replies."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    @property
    def device(self):
        return self.base.device

    def generate(self, input_ids, attention_mask, **kwargs):
        return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def slow_down(monkeypatch, engine, seconds: float) -> None:
    """Make every forward of ``engine`` take ``seconds`` longer, so requests overlap on any machine."""
    forward = engine._forward

    def slow_forward(*args):
        time.sleep(seconds)
        return forward(*args)

    monkeypatch.setattr(engine, "_forward", slow_forward)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_checkpoint(root / "tiny-base")
    from ptuning.serving import load_multi

    multi, tokenizer = load_multi(model_dir, {})
    dirs = {}
    for i, (name, (p, offset)) in enumerate(PREFIXES.items()):
        model = attach_prefix(multi.base, p, position_offset=offset)
        torch.manual_seed(10 + i)
        torch.nn.init.normal_(model.prefix_encoder.embedding.weight, std=0.5)
        dirs[name] = str(root / name)
        save_prefix(model, dirs[name])
    return model_dir, dirs, multi.base, tokenizer


def solo(files, model: str, text: str, max_new_tokens: int = MAX_NEW) -> str:
    """The greedy reply from generate_replies with only this prefix (or only the base)."""
    _, dirs, base, tokenizer = files
    conversation = [{"role": "user", "content": text}]
    if model == "tiny-base":
        return generate_replies(BareBase(base), tokenizer, [conversation], max_new_tokens=max_new_tokens)[0]
    single = MultiPrefixModel(base, {model: dirs[model]})
    return generate_replies(single, tokenizer, [conversation], max_new_tokens=max_new_tokens, prefix_ids=model)[0]


@pytest.fixture(scope="module")
def server(files):
    model_dir, dirs, _, _ = files
    app, _ = build(["--model_name_or_path", model_dir, "--prefix", f"support={dirs['support']}",
                    "--prefix", f"legal={dirs['legal']}", "--api_key", KEY, "--admin_api_key", ADMIN,
                    "--max_batch_size", "8", "--max_tokens", "64"])
    with running(app) as url:
        yield url, app.state.service


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client, model, text, stream=False, **kw):
    kw = {"max_tokens": MAX_NEW, "temperature": 0, **kw}
    messages = [{"role": "user", "content": text}]
    if not stream:
        return client.chat.completions.create(model=model, messages=messages, **kw).choices[0].message.content
    pieces = client.chat.completions.create(model=model, messages=messages, stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)


def test_models_lists_the_base_and_every_prefix(client):
    assert [m.id for m in client.models.list().data] == ["tiny-base", "support", "legal"]


def test_chat_and_completions_equal_each_prefix_alone_streamed_or_not(client, files):
    text = "hello there"
    expected = {m: solo(files, m, text) for m in ("tiny-base", "support", "legal")}
    assert len(set(expected.values())) == 3, "prefixes must change the reply for this test to mean anything"
    for model, reply in expected.items():
        assert chat(client, model, text).strip() == reply
        assert chat(client, model, text, stream=True).strip() == reply
    # /v1/completions with the same token ids as the chat prompt gives the same reply
    from ptuning.data import encode_prompt

    ids = encode_prompt(files[3], [{"role": "user", "content": text}], 10**6)
    out = client.completions.create(model="support", prompt=ids, max_tokens=MAX_NEW, temperature=0)
    assert out.choices[0].text.strip() == expected["support"]
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens >= 1
    streamed = client.completions.create(model="legal", prompt=ids, max_tokens=MAX_NEW, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed).strip() == expected["legal"]


def test_usage_stop_n_and_seed(client):
    messages = [{"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model="support", messages=messages, max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    full = out.choices[0].message.content
    stop = full[2:4]
    cut = client.chat.completions.create(model="support", messages=messages, max_tokens=5, temperature=0, stop=stop)
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="support", messages=messages, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
    sampled = [client.chat.completions.create(model="legal", messages=messages, max_tokens=8, temperature=1.0,
                                              seed=7, n=2) for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    assert len(sampled[0].choices) == 2 and sampled[0].usage.completion_tokens == 16


def test_errors_have_openai_shape_and_the_server_keeps_serving(server, client, files):
    url, service = server
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "nope", "hi")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "support", "hi", temperature=5)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="support", prompt="x" * 1100, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    raw = httpx.post(url + "/v1/chat/completions", content=b"x" * 1_000_001,
                     headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 413
    raw = httpx.post(url + "/v1/chat/completions", json={"model": "support", "messages": []},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "messages"
    raw = httpx.post(url + "/v1/chat/completions", json={"model": "support", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and "last message must have role 'user'" in raw.json()["error"]["message"]
    assert service.engine.max_queue == 64  # limits came from the flags' defaults
    assert chat(client, "support", "hello there").strip() == solo(files, "support", "hello there")


def test_eight_clients_on_three_models_at_once_each_get_their_solo_reply(server, client, files, monkeypatch):
    service = server[1]
    slow_down(monkeypatch, service.engine, 0.005)
    jobs = [(["tiny-base", "support", "legal"][i % 3], f"question {i}?", i % 2 == 0) for i in range(8)]
    expected = [solo(files, m, t, 24) for m, t, _ in jobs]
    before = service.engine.stats()["steps"]
    service.engine.peak_rows = 0
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: chat(client, job[0], job[1], stream=job[2], max_tokens=24), jobs))
    assert [r.strip() for r in replies] == expected
    stats = service.engine.stats()
    assert stats["peak_rows"] >= 3, stats  # requests really ran in one batch
    assert stats["steps"] - before < 8 * 24, stats


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, monkeypatch):
    url, service = server
    engine = service.engine
    submitted = []
    slow_down(monkeypatch, engine, 0.02)  # the 64 tokens asked for would take over a second
    monkeypatch.setattr(engine, "submit", lambda seqs, submit=engine.submit: submitted.extend(seqs) or submit(seqs))
    body = {"model": "legal", "messages": [{"role": "user", "content": "go"}], "max_tokens": 64, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert next(lines) == "" and next(lines).startswith("data: ")
    deadline = time.time() + 10
    while engine.stats()["running"] or engine.stats()["waiting"]:
        assert time.time() < deadline, engine.stats()
        time.sleep(0.02)
    (seq,) = submitted
    assert seq.finish_reason == "cancelled" and len(seq.output_ids) < 32


def test_a_full_queue_answers_429_and_recovers(files, monkeypatch):
    model_dir, dirs, _, _ = files
    app, _ = build(["--model_name_or_path", model_dir, "--prefix", f"support={dirs['support']}",
                    "--max_batch_size", "1", "--max_queue", "1", "--max_tokens", "1000"])
    service = app.state.service
    slow_down(monkeypatch, service.engine, 0.01)  # the running request lasts 9 s unless its client leaves
    body = {"model": "support", "messages": [{"role": "user", "content": "go"}], "max_tokens": 900,
            "temperature": 0, "stream": True}
    with running(app) as url, contextlib.ExitStack() as streams:
        for _ in range(2):  # one running, one waiting
            response = streams.enter_context(httpx.stream("POST", url + "/v1/chat/completions", json=body))
            assert response.status_code == 200
        deadline = time.time() + 10
        while service.engine.stats() != {**service.engine.stats(), "running": 1, "waiting": 1}:
            assert time.time() < deadline, service.engine.stats()
            time.sleep(0.01)
        refused = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        streams.close()  # both clients leave: their rows are freed
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert chat(client, "support", "hello there").strip() == solo(files, "support", "hello there")


def test_admin_adds_and_removes_prefixes_at_run_time(server, client, files):
    url, _ = server
    admin = {"Authorization": f"Bearer {ADMIN}"}
    spare = files[1]["spare"]
    assert httpx.post(url + "/admin/prefixes", json={"name": "spare", "path": spare}).status_code == 401
    assert httpx.post(url + "/admin/prefixes", json={"name": "spare", "path": spare},
                      headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    bad = httpx.post(url + "/admin/prefixes", json={"name": "x", "path": "/nonexistent"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "path"
    assert httpx.post(url + "/admin/prefixes", json={"name": "legal", "path": spare}, headers=admin).status_code == 409
    assert httpx.post(url + "/admin/prefixes", json={"name": "spare", "path": spare}, headers=admin).status_code == 200
    try:
        assert "spare" in [m.id for m in client.models.list().data]
        assert chat(client, "spare", "hello there").strip() == solo(files, "spare", "hello there")
    finally:
        assert httpx.delete(url + "/admin/prefixes/spare", headers=admin).status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(client, "spare", "hi")
    assert chat(client, "legal", "hello there").strip() == solo(files, "legal", "hello there")


def test_admin_api_is_off_without_its_key(files):
    app, _ = build(["--model_name_or_path", files[0]])
    with running(app) as url:
        response = httpx.post(url + "/admin/prefixes", json={"name": "a", "path": files[1]["spare"]},
                              headers={"Authorization": "Bearer anything"})
        assert response.status_code == 404
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny-base"  # no --api_key: open


@pytest.mark.parametrize("argv, message", [
    (["--prefix", "nodir"], "expected NAME=DIR"),
    (["--prefix", "a=/nonexistent"], "is not a directory"),
    (["--max_batch_size", "0"], "--max_batch_size: expected a value >= 1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--port", "70000"], "--port: expected 1..65535"),
])
def test_bad_flags_are_one_line_errors(files, argv, message):
    with pytest.raises(UserError, match=message) as e:
        run_serve(["--model_name_or_path", files[0], *argv])
    assert "\n" not in str(e.value)


def test_responses_are_json_events_in_openai_chunk_format(server):
    url, _ = server
    body = {"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "glm", "gpt2"])
def test_engine_rows_joining_mid_batch_equal_solo_generation(arch):
    """Requests joining a running batch at different steps, on 2 prefixes and the base, per architecture."""
    from ptuning.scheduler import Engine, SamplingParams, Sequence
    from tiny_models import VOCAB, tiny_model

    base = tiny_model(arch)
    singles = {}
    for i, (name, (p, offset)) in enumerate(list(PREFIXES.items())[:2]):
        singles[name] = attach_prefix(base, p, position_offset=offset)
        torch.manual_seed(10 + i)
        torch.nn.init.normal_(singles[name].prefix_encoder.embedding.weight, std=0.5)
    multi = MultiPrefixModel(base, singles)
    tokenizer = type("Tok", (), {"eos_token_id": None, "decode": lambda self, ids, **kw: " ".join(map(str, ids))})()
    base.generation_config.eos_token_id = None
    engine = Engine(multi, tokenizer, max_batch_size=8)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 4, 6)]
    models = ["support", "legal", None, "legal", "support", None]
    sequences = [Sequence(p, m, SamplingParams(max_tokens=6 + i, temperature=0)) for i, (p, m) in
                 enumerate(zip(prompts, models))]
    for group in ([0], [1, 2], [3], [4, 5]):  # prefilled together, then joining a batch of other lengths
        engine._admit([sequences[i] for i in group])
        engine._step()
    while engine.rows:
        engine._step()
    assert engine.peak_rows >= 4
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    for prompt, model, seq in zip(prompts, models, sequences):
        ids = torch.tensor([prompt])
        kw["max_new_tokens"] = len(seq.output_ids)
        alone = (base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw) if model is None
                 else singles[model].generate(ids, **kw))
        assert seq.output_ids == alone[0, len(prompt):].tolist(), (arch, model)
        assert len(seq.output_ids) == seq.params.max_tokens and seq.finish_reason == "length"
