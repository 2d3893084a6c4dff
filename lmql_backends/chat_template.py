"""A model's chat template: messages → the prompt text the model was tuned on.

Both users of chat messages render them here, with the tokenizer's own `apply_chat_template`
(Jinja, sandboxed by transformers): the ``/v1/chat/completions`` endpoint (server/openai/chat.py) and
LMQL's role tags in query strings (runtime/chat.py). A template is the tokenizer's, or one
given explicitly (``serve-model --chat-template FILE``, a request's ``chat_template``).
Rendering errors (a template that refuses the messages, a missing template) become
`InvalidRequestError`s that say what to change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import InvalidRequestError

#: how a message's text is marked when the final message is left open (stripped off again)
OPEN_MESSAGE_MARK = "\x00lmql-open-message\x00"


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat message: its role (system, user, assistant) and its text."""

    role: str
    content: str

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def chat_template_of(tokenizer, override: str | None = None) -> str | None:
    """The template to use: `override` when given, else the tokenizer's (None: it has none)."""
    if override is not None:
        return override
    template = getattr(tokenizer, "chat_template", None)
    return template or None


def render_messages(
    tokenizer, messages: list[Message], template: str, *, add_generation_prompt: bool = True,
    continue_final_message: bool = False, template_kwargs: dict | None = None,
) -> str:
    """The prompt text of `messages` under `template` (not tokenized).

    `add_generation_prompt` appends the header of the assistant's next message;
    `continue_final_message` leaves the last message open (no end-of-turn) so the model
    continues it. A template that refuses the messages is an InvalidRequestError.
    """
    if add_generation_prompt and continue_final_message:
        raise InvalidRequestError(
            "'add_generation_prompt' and 'continue_final_message' cannot both be true: continue the last "
            "message or start a new assistant message", "continue_final_message",
        )
    if not messages:
        raise InvalidRequestError("'messages' is empty; send at least one message", "messages")
    try:
        return tokenizer.apply_chat_template(
            [m.to_json() for m in messages], chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # jinja's TemplateError (raise_exception in the template), ValueError, ...
        raise InvalidRequestError(
            f"the chat template refused the messages: {type(exc).__name__}: {exc}; change the messages "
            f"(many templates want user and assistant turns to alternate) or use another template", "messages",
        ) from None


def render_open_message(tokenizer, closed: list[Message], role: str, template: str) -> str:
    """The prompt text up to where the content of a new message of `role` starts.

    For the assistant after at least one message this is the template's generation prompt;
    otherwise the message is rendered open (``continue_final_message``) with a mark as its
    content, and the text is cut where the mark starts.
    """
    if role == "assistant" and closed:
        return render_messages(tokenizer, closed, template, add_generation_prompt=True)
    text = render_messages(
        tokenizer, [*closed, Message(role, OPEN_MESSAGE_MARK)], template,
        add_generation_prompt=False, continue_final_message=True,
    )
    cut = text.rfind(OPEN_MESSAGE_MARK)
    if cut < 0:
        raise InvalidRequestError(
            f"the chat template drops the text of a {role} message; use a template that renders message contents",
            "messages",
        )
    return text[:cut]


def load_chat_template(value: str) -> str:
    """A chat template given as a file path (read) or as the Jinja text itself (as vLLM takes it)."""
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read the chat template file {value!r}: {exc}", "chat_template") from None
    if "{{" in value or "{%" in value:
        return value
    raise InvalidRequestError(
        f"the chat template {value!r} is neither a file nor Jinja text; pass the path of a .jinja file", "chat_template"
    )
