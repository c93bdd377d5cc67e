"""Chat prompts: the GGUF's own template in Jinja's sandbox, a plain layout without one.

The default model carries no chat template, so the template path runs on copies of it with one
spliced in (tests/gguf_edit.py): Gemma's own, and malicious ones that must not execute.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import llama_cpp
import openai
import pytest
import requests

from conftest import MODEL_NAME
from templated_models import templated_dir, tried_copies
from services.dialects.chat import ChatMessage, parse_messages, plain_layout, render_template
from services.errors import ChatTemplateError, InvalidRequest

# Gemma 3's chat template (text part), as its instruction-tuned GGUFs carry it.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def escape_attempts(marker: Path) -> list[str]:
    """Templates that would list Python's classes or run a shell command outside a sandbox."""
    return [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}",
        "{{ self._TemplateReference__context.joiner.__init__.__globals__.os.popen('touch "
        + str(marker) + "').read() }}",
    ]


HI = (ChatMessage("user", "Hi"),)


def test_a_template_that_reaches_for_python_internals_does_not_run(tmp_path):
    marker = tmp_path / "escaped"
    for template in escape_attempts(marker):
        with pytest.raises(ChatTemplateError, match="sandbox"):
            render_template(template, HI, "<bos>", "<eos>")
    assert not marker.exists()
    # The attempts are real: outside the sandbox the same template runs the command.
    jinja2.Environment().from_string(escape_attempts(marker)[1]).render()
    assert marker.exists()


def test_gemma_template_renders_turns_and_refuses_roles_out_of_order():
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"),
                ChatMessage("assistant", "Hello!"), ChatMessage("user", "Capital of France?"))
    assert render_template(GEMMA_TEMPLATE, messages, "<bos>", "<eos>") == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(InvalidRequest, match="must alternate"):
        render_template(GEMMA_TEMPLATE, (ChatMessage("user", "a"), ChatMessage("user", "b")),
                        "<bos>", "<eos>")


def test_plain_layout_for_models_without_a_template():
    messages = parse_messages([{"role": "developer", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                               {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Capital of France?"}])
    assert plain_layout(messages) == ("Be brief.\n\nUser: Hi\nAssistant: Hello!\n"
                                      "User: Capital of France?\nAssistant:")


@pytest.mark.parametrize("raw", [[], "hi", [{"role": "wizard", "content": "x"}],
                                 [{"role": "user", "content": 3}],
                                 [{"role": "user", "content": "x", "images": ["aGk="]}]])
def test_messages_that_are_refused(raw):
    with pytest.raises(InvalidRequest):
        parse_messages(raw)


@pytest.fixture(scope="session")
def templated_models(model_file, tmp_path_factory) -> dict[str, Path]:
    """Copies of the default model carrying Gemma's template, or one escape attempt, tried."""
    directory = tmp_path_factory.mktemp("templated")
    attempt = escape_attempts(directory / "escaped")[1]
    registry = tried_copies(model_file, directory, {"gemma-chat": GEMMA_TEMPLATE,
                                                    "evil-chat": attempt})
    return {"dir": directory, "registry": registry,
            **{name: directory / f"{name}.gguf" for name in ("gemma-chat", "evil-chat")}}


@pytest.fixture
def server(live, templated_models, tmp_path):
    return live(MODELS_DIR=templated_dir(templated_models["dir"], templated_models["registry"],
                                         tmp_path / "templated-models"))


def test_chat_uses_the_models_own_template(server, templated_models):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model="gemma-chat", messages=messages, max_tokens=4,
                                           temperature=0)
    vocab = llama_cpp.Llama(model_path=str(templated_models["gemma-chat"]), vocab_only=True,
                            verbose=False)
    expected = vocab.tokenize(b"<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                              b"<start_of_turn>model\n", add_bos=False, special=True)
    vocab.close()
    assert reply.usage.prompt_tokens == len(expected)
    with pytest.raises(openai.BadRequestError, match="must alternate"):
        client.chat.completions.create(model="gemma-chat", max_tokens=4, messages=[
            {"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_a_malicious_template_is_a_json_error_and_runs_nothing(server, templated_models):
    marker = templated_models["evil-chat"].parent / "escaped"
    openai_reply = requests.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "evil-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    # The model file's fault, not the server's: 422, with OpenAI's client-error type.
    assert openai_reply.status_code == 422
    error = openai_reply.json()["error"]
    assert error["code"] == "chat_template_error" and error["type"] == "invalid_request_error"
    assert "sandbox" in error["message"]
    ollama_reply = requests.post(f"{server.url}/api/chat", timeout=60, json={
        "model": "evil-chat:latest", "messages": [{"role": "user", "content": "Hi"}]})
    assert ollama_reply.status_code == 422 and "sandbox" in ollama_reply.json()["error"]
    assert not marker.exists()
    logged = server.logged_request(openai_reply.headers["X-Request-ID"])
    assert (logged["status"], logged["error"]) == (422, "chat_template_error")
    raw = requests.post(f"{server.url}/api/generate", timeout=60, json={
        "model": "evil-chat", "prompt": "The capital of France is", "raw": True, "stream": False,
        "options": {"num_predict": 3}})
    assert raw.status_code == 200 and raw.json()["eval_count"] == 3   # the weights still serve
    assert server.backend.stats.by_model()["evil-chat.gguf"]["failed"] == 2
    assert MODEL_NAME not in server.backend.stats.by_model()
