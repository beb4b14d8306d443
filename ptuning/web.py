"""A Gradio chat page on the server's own FastAPI app and engine: pick the base or a prefix, chat, compare.

    python main.py web --model_name_or_path BASE --prefix support=out/support     # page at http://127.0.0.1:8000/
    python main.py serve ... --web                                              # the same

Replies stream from the same continuous-batching engine as the API, so page users and API clients share batches.
"Compare" sends one message to the base and to a prefix at once and shows both replies side by side. The page
makes no request outside the server: analytics off, no share link, system fonts only. With ``--api_key`` the page
asks for it as the password (any user name).
"""

from __future__ import annotations

import asyncio
import hmac
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from .scheduler import SamplingParams  # noqa: E402

DEFAULTS = dict(max_tokens=256, temperature=0.0, top_p=1.0, seed=0)
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]


def _text(content) -> str:
    """Message content as Gradio hands it back: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(_text(part) for part in content or [])


def _params(max_tokens, temperature, top_p, seed) -> SamplingParams:
    return SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                          seed=None if seed in (None, "", -1) else int(seed))


def prefix_label(name) -> str:
    return f"With the prefix ({name})" if name else "With the prefix"


def build_page(service):
    """The ``gr.Blocks`` page for a ``ptuning.server.Service``."""
    import gradio as gr

    from .server import HTTPError

    def choices():
        return service.model_names()

    def first_prefix():
        return service.model.names[0] if service.model.names else service.base_name

    async def reply(model, messages, params):
        try:
            async for text in service.stream(model, messages, params):
                yield text
        except HTTPError as e:
            raise gr.Error(e.message) from None

    def conversation(history, system):
        messages = [{"role": "system", "content": system}] if system and system.strip() else []
        return messages + [{"role": m["role"], "content": _text(m["content"])} for m in history]

    async def send(message, history, model, system, max_tokens, temperature, top_p, seed):
        history = list(history or [])
        if not message or not message.strip():
            yield history, message
            return
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history, ""
        async for text in reply(model, conversation(history[:-1], system),
                                _params(max_tokens, temperature, top_p, seed)):
            history[-1] = {"role": "assistant", "content": text}
            yield history, ""

    async def regenerate(history, model, system, max_tokens, temperature, top_p, seed):
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            yield history
            return
        history.append({"role": "assistant", "content": ""})
        yield history
        async for text in reply(model, conversation(history[:-1], system),
                                _params(max_tokens, temperature, top_p, seed)):
            history[-1] = {"role": "assistant", "content": text}
            yield history

    async def compare(message, prefix, system, max_tokens, temperature, top_p, seed):
        if not message or not message.strip():
            yield "", ""
            return
        messages = conversation([{"role": "user", "content": message}], system)
        params = _params(max_tokens, temperature, top_p, seed)
        updates: asyncio.Queue = asyncio.Queue()

        async def pump(side, model):
            try:
                async for text in reply(model, messages, params):
                    await updates.put((side, text))
            except gr.Error as e:
                await updates.put((side, e))
            await updates.put((side, None))

        texts, running = ["", ""], 2
        tasks = [asyncio.create_task(pump(0, service.base_name)), asyncio.create_task(pump(1, prefix))]
        try:
            while running:
                side, text = await updates.get()
                if text is None:
                    running -= 1
                elif isinstance(text, Exception):
                    raise text
                else:
                    texts[side] = text
                    yield tuple(texts)
        finally:
            for task in tasks:
                task.cancel()

    def refresh():
        return gr.Dropdown(choices=choices()), gr.Dropdown(choices=service.model.names)

    with gr.Blocks(title="ptuning chat", analytics_enabled=False) as page:
        gr.Markdown(f"### ptuning chat: `{service.base_name}` and its prefixes")
        with gr.Accordion("Generation settings", open=False):
            system = gr.Textbox(label="System prompt", lines=2, elem_id="system")
            with gr.Row():
                max_tokens = gr.Slider(1, service.limits.max_tokens, value=min(DEFAULTS["max_tokens"],
                                                                               service.limits.max_tokens),
                                       step=1, label="Max new tokens", elem_id="max-tokens")
                temperature = gr.Slider(0.0, 2.0, value=DEFAULTS["temperature"], step=0.05,
                                        label="Temperature (0 = greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=DEFAULTS["top_p"], step=0.05, label="Top p", elem_id="top-p")
                seed = gr.Number(value=DEFAULTS["seed"], precision=0, label="Seed (-1 = random)", elem_id="seed")
        knobs = [system, max_tokens, temperature, top_p, seed]
        with gr.Tab("Chat", elem_id="tab-chat"):
            model = gr.Dropdown(choices=choices(), value=first_prefix(), label="Model (a prefix or the base)",
                                elem_id="model")
            chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", render_markdown=False, height=360,
                                 buttons=["copy", "copy_all"])  # no "share" (it posts to an outside site)
            message = gr.Textbox(label="Message", placeholder="Type a message and press Enter", elem_id="message")
            with gr.Row():
                send_button = gr.Button("Send", variant="primary", elem_id="send")
                regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
                clear_button = gr.Button("Clear", elem_id="clear")
        with gr.Tab("Compare", elem_id="tab-compare"):
            compare_prefix = gr.Dropdown(choices=service.model.names, value=service.model.names[0]
                                         if service.model.names else None, label="Prefix", elem_id="compare-model")
            compare_message = gr.Textbox(label="Message", elem_id="compare-message")
            compare_button = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Row():
                base_reply = gr.Textbox(label=f"Base ({service.base_name})", lines=8, elem_id="base-reply")
                prefix_reply = gr.Textbox(label=prefix_label(compare_prefix.value), lines=8, elem_id="prefix-reply")

        for trigger in (send_button.click, message.submit):
            trigger(send, [message, chatbot, model, *knobs], [chatbot, message])
        regenerate_button.click(regenerate, [chatbot, model, *knobs], [chatbot])
        clear_button.click(lambda: [], None, [chatbot], queue=False)
        for trigger in (compare_button.click, compare_message.submit):
            trigger(compare, [compare_message, compare_prefix, *knobs], [base_reply, prefix_reply])
        compare_prefix.change(lambda name: gr.Textbox(label=prefix_label(name)), compare_prefix, prefix_reply,
                              queue=False)
        page.load(refresh, None, [model, compare_prefix], queue=False)  # prefixes added through the admin API
    return page


def mount_web(app, service, path: str = "/", api_key: str | None = None):
    """Mount the page on the server's FastAPI app (after the API routes, which keep precedence)."""
    import gradio as gr

    auth = None
    if api_key:
        def auth(username, password):
            return hmac.compare_digest(str(password).encode(), api_key.encode())
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
    return gr.mount_gradio_app(app, build_page(service), path=path, auth=auth, theme=theme, ssr_mode=False,
                               footer_links=[], pwa=False, mcp_server=False, enable_monitoring=False)
