"""An OpenAI-compatible HTTP server for one base model and its prefixes, batched together (``ptuning.scheduler``).

    python main.py serve --model_name_or_path BASE --prefix support=out/support --prefix legal=out/legal

``GET /v1/models`` lists the base (by ``--served_model_name``) and every prefix; ``POST /v1/chat/completions`` and
``POST /v1/completions`` pick one by ``model``. Errors use OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``: unknown model 404, bad field 400 (``param`` names it), over-long
prompt 400, full queue 429, missing/wrong key 401, body too large 413. Prefixes are loaded only from directories
the operator names (flags, or the admin endpoints when ``--admin_api_key`` is set).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import os
import time
import uuid
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError
from .scheduler import Engine, QueueFull, SamplingParams, Sequence

logger = logging.getLogger(__name__)


class ServeLimits(BaseModel):
    """Server-side limits; every request is checked against them before it is queued."""

    max_tokens: int = 512  # a request's max_tokens is capped to this
    default_max_tokens: int = 256
    max_batch_size: int = 16  # rows decoded together
    max_queue: int = 64  # sequences waiting for a row; more → 429
    max_request_bytes: int = 1_000_000
    max_n: int = 8
    max_stop: int = 4


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- request bodies


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logit_bias, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False  # vLLM's extension, for benchmarks: always max_tokens tokens


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]


def _parse(cls, raw: bytes):
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise HTTPError(400, f"{param}: {first['msg']}", param=param) from None


# ---------------------------------------------------------------------------------------------- the service


class Service:
    """What the HTTP handlers and the web page share: the engine, the names of the models, prompt building."""

    def __init__(self, model, tokenizer, base_name: str, limits: ServeLimits | None = None, continuous: bool = True):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.limits = limits or ServeLimits()
        if base_name in model.names:
            raise UserError(f"--served_model_name {base_name!r}: a prefix has the same name")
        self.engine = Engine(model, tokenizer, self.limits.max_batch_size, self.limits.max_queue, continuous)
        self.created = int(time.time())
        self.context = _context_length(model.config)

    def model_names(self) -> list[str]:
        return [self.base_name] + self.model.names

    def resolve(self, name: str) -> str | None:
        """The prefix for a ``model`` field (None = the base); 404 for an unknown name."""
        if name == self.base_name:
            return None
        if name in self.model.names:
            return name
        raise HTTPError(404, f"The model {name!r} does not exist; available: {self.model_names()}", param="model",
                        code="model_not_found")

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        from .data import encode_prompt

        if messages[-1]["role"] != "user":
            raise HTTPError(400, "messages: the last message must have role 'user'", param="messages")
        turns = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"],
                  "loss": False} for m in messages]
        try:
            return encode_prompt(self.tokenizer, turns, max_source_length=10**9)
        except Exception as e:  # noqa: BLE001 - a template that rejects these turns (order, roles)
            raise HTTPError(400, f"messages: the chat template cannot render them ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})", param="messages") from None

    def text_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = len(self.tokenizer)
            if not all(0 <= t < vocab for t in prompt):
                raise HTTPError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise HTTPError(400, "prompt: one prompt per request", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise HTTPError(400, "prompt: must not be empty", param="prompt")
        return self.tokenizer(prompt).input_ids

    def sequences(self, req: _Request, prompt_ids: list[int], emit_for) -> list[Sequence]:
        """One ``Sequence`` per choice, after every limit is checked (nothing is queued on an error)."""
        prefix = self.resolve(req.model)
        lim = self.limits
        if req.n > lim.max_n:
            raise HTTPError(400, f"n: at most {lim.max_n}", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > lim.max_stop or any(not s for s in stop):
            raise HTTPError(400, f"stop: up to {lim.max_stop} non-empty strings", param="stop")
        wanted = req.max_completion_tokens or req.max_tokens or lim.default_max_tokens
        max_tokens = self.token_budget(prefix, prompt_ids, wanted, "messages" if isinstance(req, ChatRequest)
                                       else "prompt")
        return [Sequence(prompt_ids, prefix, SamplingParams(max_tokens, req.temperature, req.top_p,
                                                            None if req.seed is None else req.seed + i, tuple(stop),
                                                            req.ignore_eos),
                         emit_for(i)) for i in range(req.n)]

    def token_budget(self, prefix: str | None, prompt_ids: list[int], wanted: int, param: str) -> int:
        """``wanted`` capped by ``--max_tokens`` and the room left in the context; 400 when the prompt fills it."""
        used = len(prompt_ids) + (self.model.prefix_config(prefix).pre_seq_len if prefix else 0)
        if used >= self.context:
            raise HTTPError(400, f"This model's maximum context length is {self.context} tokens; the prompt uses "
                                 f"{used} (prefix included)", param=param, code="context_length_exceeded")
        return max(1, min(wanted, self.limits.max_tokens, self.context - used))

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences; 429 when the queue is full."""
        try:
            self.engine.submit(sequences)
        except QueueFull as e:
            raise HTTPError(429, f"The server is busy: {e}; retry later", code="rate_limit_exceeded",
                            type="rate_limit_error") from None

    async def stream(self, model: str, messages: list[dict], params: SamplingParams):
        """Reply text so far, for the web page: an async generator over one chat reply."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        prefix = self.resolve(model)
        ids = self.chat_prompt(messages)
        params = dataclasses.replace(params, max_tokens=self.token_budget(prefix, ids, params.max_tokens, "messages"))
        seq = Sequence(ids, prefix, params, _emitter(loop, queue, 0))
        self.submit([seq])
        text = ""
        try:
            while True:
                _, kind, *rest = await queue.get()
                if kind == "delta":
                    text += rest[0]
                    yield text
                elif kind == "done":
                    return
                else:
                    raise HTTPError(rest[0], rest[1], type="server_error")
        finally:
            seq.cancel()


def _context_length(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2048)


def _emitter(loop, queue: asyncio.Queue, index: int):
    def emit(*event):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, *event))
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass
    return emit


# ---------------------------------------------------------------------------------------------- the app


def create_app(service: Service, api_key: str | None = None, admin_api_key: str | None = None):
    """The FastAPI app; the engine thread starts with the app and stops with it."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    app = FastAPI(title="ptuning server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error_response(e: HTTPError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Body size and API keys, before any handler reads the body."""
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        if length > service.limits.max_request_bytes:
            return error_response(HTTPError(413, f"the request body is {length} bytes; the limit is "
                                                 f"{service.limits.max_request_bytes}"))
        path = request.url.path
        key = admin_api_key if path.startswith("/admin/") else api_key if path.startswith("/v1/") else None
        if path.startswith("/admin/") and not admin_api_key:
            return error_response(HTTPError(404, "the admin API is off (start the server with --admin_api_key)"))
        if key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error_response(HTTPError(401, "Incorrect API key provided", code="invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(HTTPError)
    async def on_http_error(request, e: HTTPError):
        return error_response(e)

    @app.exception_handler(Exception)
    async def on_error(request, e: Exception):
        logger.exception("request failed")
        return error_response(HTTPError(500, f"internal error: {type(e).__name__}", type="server_error"))

    async def body(request: Request) -> bytes:
        raw = await request.body()
        if len(raw) > service.limits.max_request_bytes:  # chunked uploads carry no content-length
            raise HTTPError(413, f"the request body is over {service.limits.max_request_bytes} bytes")
        return raw

    @app.get("/health")
    async def health():
        return {"status": "ok", **service.engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": service.created, "owned_by": "ptuning",
             "root": name, "parent": None if name == service.base_name else service.base_name}
            for name in service.model_names()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse(ChatRequest, await body(request))
        prompt_ids = service.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        return await _complete(request, req, prompt_ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await body(request))
        return await _complete(request, req, service.text_prompt(req.prompt), chat=False)

    async def _complete(request: Request, req: _Request, prompt_ids: list[int], chat: bool):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        sequences = service.sequences(req, prompt_ids, lambda i: _emitter(loop, queue, i))
        service.submit(sequences)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": req.model}

        def usage():
            completion = sum(len(s.output_ids) for s in sequences)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                    "total_tokens": len(prompt_ids) + completion}

        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            def chunk(index, text=None, finish=None, role=False):
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                    choice = {"index": index, "delta": delta, "finish_reason": finish}
                else:
                    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
                return f"data: {json.dumps({**head, 'choices': [choice]}, ensure_ascii=False)}\n\n"

            async def events():
                try:
                    if chat:
                        for i in range(len(sequences)):
                            yield chunk(i, role=True)
                    pending = len(sequences)
                    while pending:
                        index, kind, *rest = await queue.get()
                        if kind == "delta":
                            yield chunk(index, rest[0])
                        elif kind == "done":
                            pending -= 1
                            yield chunk(index, finish=rest[0])
                        else:
                            error = HTTPError(rest[0], rest[1], type="server_error")
                            yield f"data: {json.dumps(error.body())}\n\n"
                            return
                    if include_usage:
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage()})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # a client that goes away cancels its rows; finished rows ignore this
                    for seq in sequences:
                        seq.cancel()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        finish: dict[int, str] = {}
        try:
            while len(finish) < len(sequences):
                try:
                    index, kind, *rest = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "done":
                    finish[index] = rest[0]
                elif kind == "error":
                    raise HTTPError(rest[0], rest[1], type="server_error")
        finally:
            for seq in sequences:
                seq.cancel()
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                        "logprobs": None, "finish_reason": finish[i]} for i, s in enumerate(sequences)]
        else:
            choices = [{"index": i, "text": s.text, "logprobs": None, "finish_reason": finish[i]}
                       for i, s in enumerate(sequences)]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage()}

    _admin_routes(app, service)
    return app


def _admin_routes(app, service: Service) -> None:
    """Add or remove a prefix at run time (the guard answers 404 unless ``--admin_api_key`` is set)."""
    from starlette.concurrency import run_in_threadpool

    class AddPrefix(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
        path: str = Field(min_length=1)

    @app.post("/admin/prefixes")
    async def add_prefix(request: Request):
        req = _parse(AddPrefix, await request.body())
        if req.name in service.model_names():
            raise HTTPError(409, f"name: {req.name!r} is already served", param="name")
        if not os.path.isdir(req.path):
            raise HTTPError(400, f"path: {req.path!r} is not a directory on the server", param="path")
        try:
            await run_in_threadpool(service.model.add_prefix, req.name, req.path)
        except UserError as e:
            raise HTTPError(400, str(e), param="path") from None
        return {"id": req.name, "object": "model", "created": int(time.time()), "owned_by": "ptuning"}

    @app.delete("/admin/prefixes/{name}")
    async def remove_prefix(name: str):
        if name not in service.model.names:
            raise HTTPError(404, f"The model {name!r} is not a loaded prefix", param="name", code="model_not_found")
        service.model.remove_prefix(name)  # running rows keep their cached prefix; queued ones get 404
        return {"id": name, "object": "model", "deleted": True}


# ---------------------------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def serve_parser(prog: str = "serve") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, usage=f"python main.py {prog} --model_name_or_path BASE [--prefix NAME=DIR ...] [FLAGS]",
                description="OpenAI-compatible server: one base model and its prefixes, batched together.")
    p.add_argument("--model_name_or_path", required=True, help="the base model (directory or hub id)")
    p.add_argument("--prefix", action="append", default=[], metavar="NAME=DIR",
                   help="a prefix checkpoint served as model NAME (repeatable)")
    p.add_argument("--served_model_name", help="the base's model name (default: the last part of its path)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--torch_dtype", default="auto")
    p.add_argument("--quantization_bit", type=int, choices=(4, 8))
    p.add_argument("--quant_type", default="nf4", choices=("nf4", "fp4"))
    p.add_argument("--double_quant", action="store_true")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--api_key", default=os.environ.get("PTUNING_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $PTUNING_API_KEY)")
    p.add_argument("--admin_api_key", default=os.environ.get("PTUNING_ADMIN_API_KEY"),
                   help="turn on /admin/prefixes with this key (default: $PTUNING_ADMIN_API_KEY; off when unset)")
    helps = {"max_tokens": "cap on a request's max_tokens", "default_max_tokens": "when a request gives none",
             "max_batch_size": "rows decoded together", "max_queue": "requests waiting for a row; more get 429",
             "max_request_bytes": "larger bodies get 413", "max_n": "most choices per request",
             "max_stop": "most stop strings per request"}
    for name, value in ServeLimits().model_dump().items():
        p.add_argument(f"--{name}", type=int, default=value, help=f"{helps[name]} (default {value})")
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="static: a new batch starts only when the running one has finished (for comparison)")
    p.add_argument("--web", action="store_true", help="also serve the chat page at /")
    return p


def parse_prefixes(items: list[str]) -> dict[str, str]:
    prefixes = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--prefix {item!r}: expected NAME=DIR")
        if name in prefixes:
            raise UserError(f"--prefix {item!r}: the name {name!r} is given twice")
        if not os.path.isdir(path):
            raise UserError(f"--prefix {item!r}: {path!r} is not a directory")
        prefixes[name] = path
    return prefixes


def build(argv: list[str], prog: str = "serve"):
    """(app, args): flags checked, model and prefixes loaded, the app built (nothing bound yet)."""
    from .serving import load_multi

    args = serve_parser(prog).parse_args(argv)
    prefixes = parse_prefixes(args.prefix)
    for name in ServeLimits.model_fields:
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: expected a value >= 1, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port: expected 1..65535, got {args.port}")
    limits = ServeLimits(**{k: getattr(args, k) for k in ServeLimits.model_fields})
    model, tokenizer = load_multi(args.model_name_or_path, prefixes, torch_dtype=args.torch_dtype,
                                  trust_remote_code=args.trust_remote_code, quantization_bit=args.quantization_bit,
                                  quant_type=args.quant_type, double_quant=args.double_quant)
    model.eval()
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_name_or_path))
    service = Service(model, tokenizer, name, limits, continuous=args.batching == "continuous")
    app = create_app(service, api_key=args.api_key, admin_api_key=args.admin_api_key)
    if args.web or prog == "web":
        from .web import mount_web

        mount_web(app, service, api_key=args.api_key)
    return app, args


def run_serve(argv: list[str]) -> None:
    """``python main.py serve --model_name_or_path BASE --prefix NAME=DIR ... [--host] [--port] [--web]``."""
    import uvicorn

    app, args = build(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("serving on %s without --api_key: anyone who can reach this address can use the model",
                       args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def run_web(argv: list[str]) -> None:
    """``python main.py web ...``: the same server with the chat page at ``/`` (same flags as ``serve``)."""
    import uvicorn

    app, args = build(argv, prog="web")
    print(f"chat page: http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
