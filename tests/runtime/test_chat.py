"""Role tags (``<lmql:ROLE/>``) in prompts: split into messages, rendered with the chat template,
the same on all three backends."""

import pytest
from hypothesis import given, strategies as st
from transformers import AutoTokenizer

import lmql_backends as lmql
from lmql_backends.errors import InvalidRequestError
from lmql_backends.runtime.chat import has_role_tags, render_prompt, rendered_text, split_messages
from lmql_backends.runtime.tokens import prompt_ids
from lmql_backends.server.app import serve

pytestmark = pytest.mark.timeout(300)

ROLES = ("system", "user", "assistant")
QUERY = '"<lmql:system/> Be brief. <lmql:user/> Say hello. <lmql:assistant/>[ANSWER]" where len(TOKENS(ANSWER)) < 6'
TWO_TURNS = ('"<lmql:system/> Be brief. <lmql:user/> Say hello. <lmql:assistant/>[A]<lmql:user/> Again. '
             '<lmql:assistant/> Sure: [B]" where len(TOKENS(A)) < 4 and len(TOKENS(B)) < 4')
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    return AutoTokenizer.from_pretrained(chat_model_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(no_template_model_dir):
    return AutoTokenizer.from_pretrained(no_template_model_dir)


def template_ids(tokenizer, messages, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **kwargs))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# ---- splitting -------------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_characters="<"), max_size=12)


@given(st.lists(st.tuples(st.sampled_from(ROLES), texts), min_size=1, max_size=5), st.sampled_from(["", " ", "\n\t"]))
def test_a_tag_starts_a_message_whose_content_is_stripped(parts, leading):
    text = leading + "".join(f"<lmql:{role}/>{content}" for role, content in parts)
    chat = split_messages(text)
    assert [(m.role, m.content) for m in chat.closed] == [(role, content.strip()) for role, content in parts[:-1]]
    role, content = parts[-1]
    assert (chat.open.role, chat.open.content) == (role, content.lstrip())  # generation continues from its end


def test_text_without_tags_is_unchanged(tokenizer):
    assert not has_role_tags("Hello <lmql world/>")
    assert rendered_text(tokenizer, "Hello there") == "Hello there"
    bos = tokenizer.bos_token_id
    assert prompt_ids(tokenizer, "Hello", bos) == [bos, *encode(tokenizer, "Hello")]


def test_unknown_role_and_text_before_the_first_tag_are_refused():
    with pytest.raises(InvalidRequestError, match=r"unknown role tag <lmql:tool/>.*\{:user\}"):
        split_messages("<lmql:user/>hi<lmql:tool/>x")
    with pytest.raises(InvalidRequestError, match="text before its first role tag.*start it with"):
        split_messages("Intro <lmql:user/>hi")


# ---- rendering -------------------------------------------------------------------------------


def test_open_assistant_message_is_generation_prompt_then_content(tokenizer):
    text = "<lmql:system/> Be brief. <lmql:user/>\nSay hello. <lmql:assistant/> Hello"
    rendered = render_prompt(tokenizer, text, tokenizer.bos_token_id)
    assert rendered.ids == template_ids(tokenizer, MESSAGES) + encode(tokenizer, "Hello")
    expected_text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) + "Hello"
    assert rendered.text == expected_text == rendered_text(tokenizer, text)
    assert prompt_ids(tokenizer, text, tokenizer.bos_token_id) == rendered.ids


def test_empty_open_assistant_message_is_the_generation_prompt(tokenizer):
    rendered = render_prompt(tokenizer, "<lmql:system/>Be brief.<lmql:user/>Say hello.<lmql:assistant/> ", None)
    assert rendered.ids == template_ids(tokenizer, MESSAGES)


def test_open_user_message_continues_that_message(tokenizer):
    rendered = render_prompt(tokenizer, "<lmql:system/>Be brief.<lmql:user/>Say", None)
    assert rendered.text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay"
    prefix = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert rendered.ids == encode(tokenizer, prefix) + encode(tokenizer, "Say")


def test_open_message_keeps_its_trailing_text(tokenizer):
    text = "<lmql:system/>Be brief.<lmql:user/>Say hello.<lmql:assistant/> A: x and "
    rendered = render_prompt(tokenizer, text, None)
    assert rendered.ids == template_ids(tokenizer, MESSAGES) + encode(tokenizer, "A: x and ")


def test_a_first_assistant_message_gets_its_header(tokenizer):
    assert render_prompt(tokenizer, "<lmql:assistant/>Hi", None).text == "<|im_start|>assistant\nHi"


def test_no_template_renders_plain_role_lines_after_bos(plain_tokenizer):
    text = "<lmql:system/> Be brief. <lmql:user/>Say hello.<lmql:assistant/> Hello"
    rendered = render_prompt(plain_tokenizer, text, plain_tokenizer.bos_token_id)
    prefix = "((system)): Be brief.\n((user)): Say hello.\n((assistant)):"
    assert rendered.text == prefix + " Hello"
    content_ids = encode(plain_tokenizer, " Hello")
    assert rendered.ids == [plain_tokenizer.bos_token_id, *encode(plain_tokenizer, prefix), *content_ids]


def test_template_that_refuses_the_messages_is_an_invalid_request(tokenizer):
    strict = ("{% if messages[0]['role'] != 'user' %}"
              "{{ raise_exception('the first message must be the user') }}{% endif %}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = strict
    with pytest.raises(InvalidRequestError, match="chat template refused the messages.*first message must be the user"):
        render_prompt(tokenizer, "<lmql:system/>x<lmql:assistant/>", None)


# ---- queries on the three backends -----------------------------------------------------------


@pytest.fixture(scope="module")
def servers(chat_model_dir):
    new = serve(chat_model_dir, port=0, background=True)
    legacy = serve(chat_model_dir, port=0, legacy=True, background=True)
    yield new, legacy
    new.stop()
    legacy.stop()


def test_role_tag_query_agrees_on_all_backends_and_sees_the_template(chat_model_dir, servers, tokenizer):
    new, legacy = servers
    in_process = lmql.run_sync(QUERY, model=lmql.inprocess(chat_model_dir))
    on_new = lmql.run_sync(QUERY, model=lmql.model(chat_model_dir, endpoint=new.endpoint))
    on_legacy = lmql.run_sync(QUERY, model=lmql.model(chat_model_dir, endpoint=legacy.endpoint),
                              decoder="argmax(backend='legacy')")
    answer = in_process.variables["ANSWER"]
    assert answer and (on_new.prompt, on_new.variables) == (in_process.prompt, in_process.variables)
    assert (on_legacy.prompt, on_legacy.variables) == (in_process.prompt, in_process.variables)
    template_text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert in_process.prompt == template_text + answer


def test_role_tag_query_answer_is_greedy_completion_of_template_ids(chat_model_dir, servers, tokenizer):
    """The model saw exactly the template's ids: its greedy answer is /v1/completions' on them."""
    from openai import OpenAI

    new, _ = servers
    result = lmql.run_sync(QUERY, model=lmql.model(chat_model_dir, endpoint=new.endpoint))
    client = OpenAI(base_url=f"http://{new.endpoint}/v1", api_key="none")
    completion = client.completions.create(
        model=chat_model_dir, prompt=template_ids(tokenizer, MESSAGES), max_tokens=5, temperature=0,
    )
    assert result.variables["ANSWER"] == completion.choices[0].text


def test_two_turn_query_agrees_on_all_backends_and_renders_each_turn(chat_model_dir, servers, tokenizer):
    new, legacy = servers
    results = [
        lmql.run_sync(TWO_TURNS, model=lmql.inprocess(chat_model_dir)),
        lmql.run_sync(TWO_TURNS, model=lmql.model(chat_model_dir, endpoint=new.endpoint)),
        lmql.run_sync(TWO_TURNS, model=lmql.model(chat_model_dir, endpoint=legacy.endpoint),
                      decoder="argmax(backend='legacy')"),
    ]
    assert len({(r.prompt, tuple(r.variables.items())) for r in results}) == 1
    a, b = results[0].variables["A"], results[0].variables["B"]
    turns = [*MESSAGES, {"role": "assistant", "content": a.strip()}, {"role": "user", "content": "Again."}]
    expected = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) + "Sure: " + b
    assert results[0].prompt == expected
