"""The new API's ``/v1/chat/completions``: OpenAI chat messages on the model's chat template.

A chat request is a completion request whose prompt is made from its messages: the body's
``messages`` are rendered with the chat template (the request's ``chat_template``, else
``serve-model --chat-template``, else the tokenizer's; chat_template.py), tokenized, and
become the one prompt of the same typed `CompletionRequest` that ``/v1/completions`` uses
(every other field is read by completions.py, so the validation, limits and errors are the
same). The choices run, stream and cancel through api.py; only the answer's shape
(`ChatFormat`) and the logprobs' shape (`ChatChoiceBuilder`) are chat's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from ...chat_template import Message, chat_template_of, render_messages
from ...errors import ContextLengthError, InvalidRequestError
from ..state import ServerState
from ..validation import is_valid_unicode, json_type
from .api import CompletionFormat, answer_completion
from .completions import (
    CompletionRequest, check_fits_context, check_is_object, check_range, read_bool, read_int, read_optional_int,
    read_shared_fields,
)
from .text import ChoiceBuilder, ChoiceDelta, decode_ids, finite, token_bytes

#: the message roles a chat request may use; "developer" is OpenAI's newer name for "system"
#: OpenAI's bound on top_logprobs in the chat format
MAX_TOP_LOGPROBS = 20
ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED_FIELDS = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "audio": "audio output",
}


def add_routes(app: web.Application) -> None:
    """Add the chat endpoint (with and without the /v1 prefix)."""
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", create_chat_completion)


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions: the messages on the chat template, then as /v1/completions."""
    return await answer_completion(request, parse_chat_request, CHAT_FORMAT)


# ---- the request -------------------------------------------------------------------------


def parse_chat_request(body: Any, state: ServerState) -> CompletionRequest:
    """A chat body as the CompletionRequest of its templated prompt; bad values raise InvalidRequestError."""
    check_is_object(body)
    shared = read_shared_fields(body, state)
    check_chat_unsupported(body)
    ids = tokenize(state.loaded.tokenizer, render_chat_prompt(body, state))
    max_tokens = read_chat_max_tokens(body, len(ids), state.loaded.context_length)
    check_fits_context((ids,), max_tokens, state.loaded.context_length)
    return CompletionRequest(prompts=(ids,), max_tokens=max_tokens, logprobs=read_chat_logprobs(body), **shared)


def render_chat_prompt(body: dict, state: ServerState) -> str:
    """The prompt text of the request's messages, with its template options."""
    messages = read_messages(body)
    template = read_template(body, state)
    continue_final = read_bool(body, "continue_final_message", False)
    add_generation_prompt = read_bool(body, "add_generation_prompt", not continue_final)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidRequestError(
            f"'chat_template_kwargs' must be an object, got {json_type(kwargs)}", "chat_template_kwargs"
        )
    return render_messages(
        state.loaded.tokenizer, messages, template, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final, template_kwargs=kwargs,
    )


def read_template(body: dict, state: ServerState) -> str:
    """The request's chat_template, else the server's, else the tokenizer's; a 400 naming the fix if none."""
    override = body.get("chat_template")
    if override is not None and not state.config.trust_request_chat_template:
        raise InvalidRequestError(
            "this server does not take a 'chat_template' in requests (it would run the request's Jinja); omit it, "
            "or start serve-model with --chat-template FILE or --trust-request-chat-template", "chat_template",
        )
    if override is not None and (not isinstance(override, str) or not override.strip()):
        raise InvalidRequestError(
            f"'chat_template' must be a non-empty Jinja template string, got {json_type(override)}", "chat_template"
        )
    template = chat_template_of(state.loaded.tokenizer, override or state.config.chat_template)
    if template is None:
        raise InvalidRequestError(
            f"the model {state.model_name!r} has no chat template, so /v1/chat/completions cannot turn messages "
            "into a prompt; start serve-model with --chat-template FILE (a Jinja chat template), "
            "or use /v1/completions with a prompt", "messages",
        )
    return template


def read_messages(body: dict) -> list[Message]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if messages == [] else json_type(messages)
        raise InvalidRequestError(
            f"'messages' must be a non-empty array of {{\"role\", \"content\"}} objects, got {got}", "messages"
        )
    return [read_message(i, m) for i, m in enumerate(messages)]


def read_message(index: int, message: Any) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequestError(f"'{where}' must be an object with 'role' and 'content', got {json_type(message)}",
                                  "messages")
    role = message.get("role")
    if role not in ROLE_NAMES:
        raise InvalidRequestError(
            f"'{where}.role' is {role!r}; the roles are system, user and assistant (developer is taken as system; "
            "tool messages need tool calling, which this server does not support)", "messages",
        )
    if message.get("tool_calls") or message.get("function_call"):
        raise InvalidRequestError(f"'{where}' has tool calls; this server does not support tool calling", "messages")
    return Message(ROLE_NAMES[role], read_content(where, message.get("content")))


def read_content(where: str, content: Any) -> str:
    """A message's text: a string, or an array of text parts (joined with newlines, as vLLM does)."""
    if isinstance(content, list) and content:
        text = "\n".join(read_text_part(f"{where}.content[{i}]", part) for i, part in enumerate(content))
    elif isinstance(content, str):
        text = content
    else:
        got = "an empty array" if content == [] else json_type(content)
        raise InvalidRequestError(
            f"'{where}.content' must be a string or a non-empty array of text parts, got {got}", "messages"
        )
    if not is_valid_unicode(text):
        raise InvalidRequestError(
            f"'{where}.content' contains an unpaired surrogate (an invalid \\u escape); send valid Unicode", "messages"
        )
    return text


def read_text_part(where: str, part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind != "text":
        shown = repr(kind) if kind is not None else json_type(part)
        raise InvalidRequestError(
            f"'{where}' is a {shown} part; this server serves a text model and takes only "
            "{\"type\": \"text\", \"text\": ...} parts", "messages",
        )
    if not isinstance(part.get("text"), str):
        raise InvalidRequestError(f"'{where}.text' must be a string, got {json_type(part.get('text'))}", "messages")
    return part["text"]


def check_chat_unsupported(body: dict) -> None:
    """OpenAI chat parameters this server does not implement, refused rather than ignored."""
    for name, feature in UNSUPPORTED_FIELDS.items():
        if body.get(name) not in (None, [], "none"):
            raise InvalidRequestError(f"'{name}': this server does not support {feature}; omit it", name)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise InvalidRequestError(
            "'response_format' other than {\"type\": \"text\"} is not supported; constrain the output with an "
            "LMQL query (where clause) or with 'allowed_token_ids'", "response_format",
        )


def read_chat_logprobs(body: dict) -> int | None:
    """How many top alternatives to report per token (None: no logprobs): logprobs=true, top_logprobs 0..20."""
    wants = read_bool(body, "logprobs", False)
    top = read_int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not wants:
        raise InvalidRequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wants else None


def read_chat_max_tokens(body: dict, num_prompt_tokens: int, context_length: int) -> int:
    """max_completion_tokens (or its old name max_tokens), >= 1; by default the rest of the context."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = read_optional_int(body, name)
    if value is not None:
        check_range(name, value, 1, context_length)
        return value
    room = context_length - num_prompt_tokens
    if room < 1:
        raise ContextLengthError(
            f"the messages make a prompt of {num_prompt_tokens} tokens, which leaves no room in the model's context "
            f"of {context_length} tokens; send shorter messages", "messages",
        )
    return room


def tokenize(tokenizer, text: str) -> tuple[int, ...]:
    """The ids of the rendered prompt, as apply_chat_template(tokenize=True) makes them."""
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


# ---- the answer ----------------------------------------------------------------------------


@dataclasses.dataclass
class ChatLogprobs:
    """The chat ``logprobs`` of some tokens: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""

    content: list[dict] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.content)

    def extend(self, other: "ChatLogprobs") -> None:
        self.content.extend(other.content)

    def to_json(self) -> dict:
        return {"content": self.content, "refusal": None}


class ChatChoiceBuilder(ChoiceBuilder):
    """A ChoiceBuilder whose logprobs are chat-shaped: exactly top_logprobs alternatives, with bytes."""

    def new_delta(self, num_tokens: int = 0) -> ChoiceDelta:
        logprobs = ChatLogprobs() if self.completion.wants_logprobs else None
        return ChoiceDelta(self.plan.index, logprobs=logprobs, num_tokens=num_tokens)

    def add_logprobs(self, part: ChatLogprobs, token_id: int, logprob: float | None, top, offset: int) -> None:
        alternatives = [self.token_entry(t, lp) for t, lp in top if lp > float("-inf")]
        part.content.append({**self.token_entry(token_id, logprob), "top_logprobs": alternatives})

    def token_entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.namer.name(token_id), "logprob": finite(logprob), "bytes": self.token_bytes(token_id)}

    def token_bytes(self, token_id: int) -> list[int] | None:
        """The UTF-8 bytes of the token (its raw bytes when it is part of a character)."""
        if token_id >= len(self.tokenizer):
            return None
        raw = token_bytes(self.tokenizer.convert_ids_to_tokens(token_id))
        if raw is None:
            raw = decode_ids(self.tokenizer, [token_id], skip_special_tokens=False).encode()
        return list(raw)


class ChatFormat(CompletionFormat):
    """``chat.completion`` objects and ``chat.completion.chunk`` events (the role comes first)."""

    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    builder = ChatChoiceBuilder

    def choice_json(self, choice: ChoiceDelta) -> dict:
        message = {"role": "assistant", "content": choice.text}
        return {"index": choice.index, "message": message, **self.choice_tail(choice)}

    def chunk_choice_json(self, delta: ChoiceDelta) -> dict:
        content = {"content": delta.text} if delta.text else {}
        return {"index": delta.index, "delta": content, **self.choice_tail(delta)}

    def opening_chunk_choices(self, num_choices: int) -> list[dict]:
        opening = {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [{"index": i, **opening} for i in range(num_choices)]

    @staticmethod
    def choice_tail(choice: ChoiceDelta) -> dict:
        logprobs = choice.logprobs.to_json() if choice.logprobs is not None else None
        return {"logprobs": logprobs, "finish_reason": choice.finish_reason}


CHAT_FORMAT = ChatFormat()
