"""``/v1/chat/completions`` with the official `openai` SDK against real servers on loopback.

The model is built in the test (tests/conftest.py: a tiny Llama whose tokenizer has a ChatML
chat template); a twin without a template checks the errors and the template options.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request

import aiohttp
import openai
import pytest
from transformers import AutoTokenizer

from lmql_backends.server.app import serve

pytestmark = pytest.mark.timeout(180)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello to the world."}]
TEMPLATE = (  # a second template, different from the model's own
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def chat_server(chat_model_dir):
    handle = serve(chat_model_dir, port=0, background=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def plain_server(no_template_model_dir):
    handle = serve(no_template_model_dir, port=0, background=True, engine_process=False,
                   trust_request_chat_template=True)
    yield handle
    handle.stop()


def make_sdk(handle) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{handle.endpoint}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def sdk(chat_server) -> openai.OpenAI:
    return make_sdk(chat_server)


@pytest.fixture(scope="module")
def model(chat_model_dir) -> str:
    return chat_model_dir


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    return AutoTokenizer.from_pretrained(chat_model_dir)


def template_ids(tokenizer, messages, **kwargs) -> list[int]:
    kwargs.setdefault("add_generation_prompt", True)
    return list(tokenizer.apply_chat_template(messages, return_dict=False, **kwargs))


async def post(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.post(url, json=body) as response:
            return response.status, await response.json(content_type=None)


# ---- answers -------------------------------------------------------------------------------


def test_chat_answers_a_chat_completion_on_the_template(sdk, model, tokenizer):
    answer = sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == model
    [choice] = answer.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("length", "stop") and choice.logprobs is None
    assert answer.usage.prompt_tokens == len(template_ids(tokenizer, MESSAGES))
    assert 1 <= answer.usage.completion_tokens <= 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_greedy_chat_equals_completions_on_the_templated_prompt(sdk, model, tokenizer):
    as_ids = {"return_tokens_as_token_ids": True}
    chat = sdk.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=12, temperature=0, logprobs=True, top_logprobs=2,
        extra_body=as_ids,
    )
    completion = sdk.completions.create(
        model=model, prompt=template_ids(tokenizer, MESSAGES), max_tokens=12, temperature=0, logprobs=2,
        extra_body=as_ids,
    )
    chat_tokens = [entry.token for entry in chat.choices[0].logprobs.content]
    assert chat_tokens == completion.choices[0].logprobs.tokens and len(chat_tokens) == chat.usage.completion_tokens
    assert chat.choices[0].message.content == completion.choices[0].text
    assert [e.logprob for e in chat.choices[0].logprobs.content] == completion.choices[0].logprobs.token_logprobs
    assert chat.choices[0].finish_reason == completion.choices[0].finish_reason


def test_list_of_text_parts_is_the_same_as_their_joined_string(sdk, model):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
             MESSAGES[1]]
    joined = [{"role": "system", "content": "Be\nbrief."}, MESSAGES[1]]
    answers = [sdk.chat.completions.create(model=model, messages=m, max_tokens=6, temperature=0)
               for m in (parts, joined)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage == answers[1].usage


def test_developer_role_is_taken_as_system(sdk, model):
    developer = [{"role": "developer", "content": "Be brief."}, MESSAGES[1]]
    answers = [sdk.chat.completions.create(model=model, messages=m, max_tokens=6, temperature=0)
               for m in (developer, MESSAGES)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage == answers[1].usage


def test_streamed_chat_sends_the_role_then_deltas_then_usage(sdk, model):
    whole = sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(sdk.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(chat_server, model):
    async def frames():
        body = {"model": model, "messages": MESSAGES, "max_tokens": 3, "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://{chat_server.endpoint}/chat/completions", json=body) as response:
                assert response.status == 200 and response.content_type == "text/event-stream"
                return [line.decode().strip() async for line in response.content if line.strip()]

    lines = asyncio.run(frames())
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])


def test_logprobs_have_the_chat_shape(sdk, model):
    answer = sdk.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == entry.top_logprobs[0].logprob  # greedy
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    without_top = sdk.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=2, temperature=0, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in without_top.choices[0].logprobs.content)


def test_n_choices_are_seeded_and_indexed(sdk, model):
    def ask(**kwargs):
        return sdk.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=6, n=3, temperature=1.0, seed=5, **kwargs)

    answer = ask()
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert [c.message.content for c in ask().choices] == [c.message.content for c in answer.choices]
    chunks = list(ask(stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    streamed = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)}
    assert [streamed[i] for i in range(3)] == [c.message.content for c in answer.choices]


def test_stop_string_ends_the_answer_before_it(sdk, model):
    whole = sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0)
    text = whole.choices[0].message.content
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), text
    stopped = sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_default_max_tokens_is_the_rest_of_the_context(chat_server, sdk, model, tokenizer):
    answer = sdk.chat.completions.create(model=model, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True})
    context = chat_server.state.loaded.context_length
    assert answer.usage.completion_tokens == context - len(template_ids(tokenizer, MESSAGES))
    assert answer.choices[0].finish_reason == "length"


def test_continue_final_message_continues_the_assistant(sdk, model, tokenizer):
    messages = [*MESSAGES, {"role": "assistant", "content": "Hello"}]
    answer = sdk.chat.completions.create(
        model=model, messages=messages, max_tokens=4, temperature=0, extra_body={"continue_final_message": True},
    )
    ids = template_ids(tokenizer, messages, add_generation_prompt=False, continue_final_message=True)
    assert answer.usage.prompt_tokens == len(ids)
    completion = sdk.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0)
    assert answer.choices[0].message.content == completion.choices[0].text


def test_client_leaving_a_stream_cancels_the_generation(chat_server, model):
    engine = chat_server.state.engine
    before = engine.stats().num_generated_tokens

    async def leave_early():
        body = {"model": model, "messages": MESSAGES, "stream": True, "ignore_eos": True, "temperature": 1.0}
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"http://{chat_server.endpoint}/v1/chat/completions", json=body)
            frames = 0
            while frames < 3:
                line = await asyncio.wait_for(response.content.readline(), 30)
                frames += line.startswith(b"data: ")
            response.close()
        for _ in range(100):  # bounded: until the engine's statistics show it idle
            stats = engine.stats()
            if stats.num_running == stats.num_waiting == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    assert asyncio.run(leave_early())
    assert engine.stats().num_generated_tokens - before < chat_server.state.loaded.context_length // 2


# ---- errors --------------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"messages": []}, "'messages' must be a non-empty array"),
    ({"messages": "hi"}, "'messages' must be a non-empty array"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"'messages\[0\].role' is 'robot'; the roles are"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "tool messages need tool calling"),
    ({"messages": [{"content": "hi"}]}, r"'messages\[0\].role' is None"),
    ({"messages": ["hi"]}, r"'messages\[0\]' must be an object"),
    ({"messages": [{"role": "user"}]}, r"'messages\[0\].content' must be a string or a non-empty array"),
    ({"messages": [{"role": "user", "content": []}]}, "got an empty array"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     r"'messages\[0\].content\[0\]' is a 'image_url' part; this server serves a text model"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, r"content\[0\].text' must be a string"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, r"content\[0\]' is a a string part"),
    ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
    ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be between 0 and 20"),
    ({"logprobs": 3}, "'logprobs' must be true or false"),
    ({"max_tokens": 0}, "'max_tokens' must be between 1 and"),
    ({"max_completion_tokens": -1}, "'max_completion_tokens' must be between 1 and"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "does not support tool calling"),
    ({"response_format": {"type": "json_object"}}, "'response_format' other than"),
    ({"temperature": 3}, "'temperature' must be between 0.0 and 2.0"),
    ({"add_generation_prompt": True, "continue_final_message": True}, "cannot both be true"),
    ({"chat_template_kwargs": []}, "'chat_template_kwargs' must be an object"),
    ({"chat_template": TEMPLATE}, "does not take a 'chat_template' in requests.*--trust-request-chat-template"),
]


@pytest.mark.parametrize(("change", "message"), BAD_REQUESTS)
def test_bad_requests_are_openai_style_400s(sdk, model, change, message):
    with pytest.raises(openai.BadRequestError) as info:  # extra_body replaces the SDK's fields
        sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, extra_body=change)
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] is not None
    assert re.search(message, error["message"]), error["message"]


def test_too_long_messages_are_a_context_length_error(sdk, model):
    long = [{"role": "user", "content": "word " * 600}]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=model, messages=long)
    assert info.value.body["code"] == "context_length_exceeded" and "no room" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=500)
    assert info.value.body["code"] == "context_length_exceeded"


def test_wrong_model_is_a_404(sdk):
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)


def test_model_without_template_is_a_400_naming_the_fix(plain_server, no_template_model_dir):
    with pytest.raises(openai.BadRequestError) as info:
        make_sdk(plain_server).chat.completions.create(model=no_template_model_dir, messages=MESSAGES, max_tokens=2)
    assert "has no chat template" in info.value.body["message"] and "--chat-template FILE" in info.value.body["message"]


@pytest.mark.parametrize(("template", "message"), [
    (5, "'chat_template' must be a non-empty Jinja template string"),
    ("{{ raise_exception('roles must alternate') }}", "chat template refused.*roles must alternate"),
])
def test_bad_request_chat_template_is_a_400(plain_server, no_template_model_dir, template, message):
    with pytest.raises(openai.BadRequestError) as info:
        make_sdk(plain_server).chat.completions.create(
            model=no_template_model_dir, messages=MESSAGES, max_tokens=2, extra_body={"chat_template": template})
    assert re.search(message, info.value.body["message"]), info.value.body["message"]
    assert info.value.body["param"] in ("chat_template", "messages")


def test_request_chat_template_is_used(plain_server, no_template_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(no_template_model_dir)
    sdk = make_sdk(plain_server)
    answer = sdk.chat.completions.create(
        model=no_template_model_dir, messages=MESSAGES, max_tokens=5, temperature=0,
        extra_body={"chat_template": TEMPLATE},
    )
    ids = template_ids(tokenizer, MESSAGES, chat_template=TEMPLATE)
    assert answer.usage.prompt_tokens == len(ids)
    completion = sdk.completions.create(model=no_template_model_dir, prompt=ids, max_tokens=5, temperature=0)
    assert answer.choices[0].message.content == completion.choices[0].text


def test_serve_model_chat_template_flag(no_template_model_dir, tmp_path):
    """The real `serve-model --chat-template FILE` in a subprocess serves chat on a model without one."""
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    with socket.socket() as sock:  # a free port for the subprocess
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "lmql_backends.cli", "serve-model", no_template_model_dir, "--port", str(port),
               "--chat-template", str(template_file), "--no-engine-process"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(port, process)
        body = {"model": no_template_model_dir, "messages": MESSAGES, "max_tokens": 3}
        status, answer = asyncio.run(post(f"http://127.0.0.1:{port}/v1/chat/completions", body))
        ids = template_ids(AutoTokenizer.from_pretrained(no_template_model_dir), MESSAGES, chat_template=TEMPLATE)
        assert status == 200 and answer["usage"]["prompt_tokens"] == len(ids), json.dumps(answer)
    finally:
        process.kill()
        process.wait(timeout=30)


def test_legacy_server_refuses_a_chat_template(no_template_model_dir):
    from lmql_backends.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="legacy API"):
        serve(no_template_model_dir, port=0, legacy=True, background=True, chat_template=TEMPLATE)


def wait_until_healthy(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll /health until the subprocess answers (or exits, or the time is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve-model exited early: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"serve-model did not answer on port {port}")
