"""LMQL's role tags: prompt text with ``<lmql:ROLE/>`` markers → chat messages → the model's ids.

A query string's ``{:system}``, ``{:user}`` and ``{:assistant}`` put the marker
``<lmql:ROLE/>`` (as LMQL 0.7.3 does) into the prompt text. A marker starts a message of that
role; its content is the text up to the next marker, with leading and trailing white space
stripped. The last message is the one being generated and is left open: no end of turn, and
only its leading white space is stripped (generation continues from its text as written, so
``{:assistant} A: [X] and [Y]`` shows the model ``and `` before Y, as a plain prompt would).

The ids the model sees:

- on a model with a chat template: the template applied to the closed messages with the
  generation prompt, then the ids of the open message's content (an open message of another
  role than assistant is rendered with ``continue_final_message``);
- on a model without one, the plain rendering LMQL 0.7.3 uses for such models: BOS, then one
  ``((ROLE)): content`` line per closed message, then ``((ROLE)):`` and, when the open message
  has content, a space and that content.

Every backend runs the same function on the client's tokenizer, so their answers agree.
"""

from __future__ import annotations

import dataclasses
import re

from ..chat_template import Message, chat_template_of, render_open_message
from ..errors import InvalidRequestError
from .result import QueryResult

ROLE_TAG = re.compile(r"<lmql:([^/>]*)/>")
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """Prompt text split at its role tags: the closed messages and the open last one."""

    closed: tuple[Message, ...]
    open: Message


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    """What the model sees for a tagged prompt: the text (for results, without BOS) and its ids."""

    text: str
    ids: list[int]


def has_role_tags(text: str) -> bool:
    """Whether `text` contains an ``<lmql:ROLE/>`` marker."""
    return ROLE_TAG.search(text) is not None


def split_messages(text: str) -> ChatPrompt:
    """The messages of tagged prompt text; text before the first tag must be white space."""
    tags = list(ROLE_TAG.finditer(text))
    if not tags:
        raise InvalidRequestError("the prompt has no role tag; use {:system}, {:user} or {:assistant}", "prompt")
    before = text[: tags[0].start()]
    if before.strip():
        raise InvalidRequestError(
            f"the prompt has text before its first role tag ({before.strip()[:40]!r}); start it with "
            "{:system} or {:user}, or put that text inside a message", "prompt",
        )
    closed = [Message(check_role(tag.group(1)), text[tag.end():following.start()].strip())
              for tag, following in zip(tags, tags[1:])]
    last = tags[-1]
    return ChatPrompt(tuple(closed), Message(check_role(last.group(1)), text[last.end():].lstrip()))


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidRequestError(
            f"unknown role tag <lmql:{role}/>; the roles are {', '.join(ROLES)} "
            "({:system}, {:user}, {:assistant})",
            "prompt",
        )
    return role


def render_prompt(tokenizer, text: str, bos_token_id: int | None) -> RenderedPrompt:
    """The rendered text and ids of tagged prompt `text` (see the module docstring)."""
    chat = split_messages(text)
    template = chat_template_of(tokenizer)
    if template is None:
        prefix = plain_prefix(chat)
        content = f" {chat.open.content}" if chat.open.content else ""
        bos = [bos_token_id] if bos_token_id is not None else []
    else:
        prefix = render_open_message(tokenizer, list(chat.closed), chat.open.role, template)
        content, bos = chat.open.content, []
    ids = bos + encode(tokenizer, prefix) + encode(tokenizer, content)
    return RenderedPrompt(prefix + content, ids)


def plain_prefix(chat: ChatPrompt) -> str:
    """The plain rendering up to the open message's content."""
    lines = [f"(({m.role})): {m.content}" if m.content else f"(({m.role})):" for m in chat.closed]
    return "".join(line + "\n" for line in lines) + f"(({chat.open.role})):"


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def rendered_text(tokenizer, text: str) -> str:
    """`text` as the model sees it: rendered when it has role tags, else unchanged."""
    if not has_role_tags(text):
        return text
    return render_prompt(tokenizer, text, None).text


def with_rendered_prompt(result: QueryResult, tokenizer) -> QueryResult:
    """`result` with its prompt as the model saw it (see `rendered_text`)."""
    return dataclasses.replace(result, prompt=rendered_text(tokenizer, result.prompt))
