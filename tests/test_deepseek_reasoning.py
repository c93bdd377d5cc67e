"""`<think>` splitting: the same answer and reasoning however the text is cut into tokens."""

from __future__ import annotations

import itertools

import pytest

from DeepSeekLLM.model_cache import ModelTokenizer, split_template
from DeepSeekLLM.reasoning import ReasoningSplitter, split_reasoning

CASES = [
    # (output, the prompt opened <think> itself, answer, reasoning)
    ("<think>\nAdd 2 and 2.\n</think>\n\nThe answer is 4.", False, "The answer is 4.",
     "Add 2 and 2.\n"),
    ("Add 2 and 2.\n</think>\n\nIt is 4.", True, "It is 4.", "Add 2 and 2.\n"),
    ("Plain answer, no reasoning.", False, "Plain answer, no reasoning.", ""),
    ("a<think>b</think>c<think>d</think>e", False, "ace", "bd"),
    ("<think>never closed, cut off by max_tokens", False, "", "never closed, cut off by max_tokens"),
    ("x < y and </thin is not a tag <thin", False, "x < y and </thin is not a tag <thin", ""),
    ("<think></think>", False, "", ""),
]


def feed_all(pieces: list[str], thinking: bool) -> tuple[str, str, list[tuple[str, str]]]:
    splitter = ReasoningSplitter(thinking)
    parts = [part for piece in pieces for part in splitter.feed(piece)] + splitter.flush()
    answer = "".join(text for kind, text in parts if kind == "text")
    reasoning = "".join(text for kind, text in parts if kind == "reasoning")
    return answer, reasoning, parts


@pytest.mark.parametrize("output,thinking,answer,reasoning", CASES)
def test_whole_text(output, thinking, answer, reasoning):
    assert split_reasoning(output, thinking) == (answer, reasoning)


@pytest.mark.parametrize("output,thinking,answer,reasoning", CASES)
def test_every_cut_into_two_and_three_pieces(output, thinking, answer, reasoning):
    cuts = range(1, len(output))
    for points in itertools.chain(((i,) for i in cuts), itertools.combinations(cuts, 2)):
        bounds = (0, *points, len(output))
        pieces = [output[a:b] for a, b in zip(bounds, bounds[1:])]
        assert feed_all(pieces, thinking)[:2] == (answer, reasoning), pieces


@pytest.mark.parametrize("output,thinking,answer,reasoning", CASES)
def test_one_character_at_a_time(output, thinking, answer, reasoning):
    assert feed_all(list(output), thinking)[:2] == (answer, reasoning)


@pytest.fixture(scope="module")
def tokenizer(model_file):
    tokenizer = ModelTokenizer(str(model_file))
    yield tokenizer
    tokenizer.close()


@pytest.mark.parametrize("output,thinking,answer,reasoning", CASES)
def test_the_models_own_tokens(tokenizer, output, thinking, answer, reasoning):
    # The real tokenizer cuts "<think>" into "<", "think", ">": fed token by token as generated.
    pieces = [tokenizer.detokenize([token]) for token in tokenizer.tokenize(output)]
    assert len(pieces) > 1
    got_answer, got_reasoning, parts = feed_all(pieces, thinking)
    assert (got_answer, got_reasoning) == (answer, reasoning)
    assert all("<think>" not in text and "</think>" not in text for _, text in parts)


def test_nothing_is_held_back_but_a_possible_tag():
    splitter = ReasoningSplitter()
    assert splitter.feed("The answer ") == [("text", "The answer ")]
    assert splitter.feed("is <th") == [("text", "is ")]
    assert splitter.feed("ree") == [("text", "<three")]


# The shape of DeepSeek-R1's template (written for this test): the turn, then an assistant
# prefix that opens the reasoning block.
R1_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
           "{{ '<｜User｜>' + m['content'] }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")


def test_a_template_that_opens_think_is_split_around_the_message():
    before, after = split_template(R1_LIKE, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
    assert before == "<｜begin▁of▁sentence｜><｜User｜>"
    assert after == "<｜Assistant｜><think>\n"


@pytest.mark.parametrize("template", [None, "", "{{ raise_exception('no') }}",
                                      "{{ messages[0]['content'] * 2 }}", "{% if %}"])
def test_templates_that_cannot_be_split_fall_back_to_plain(template):
    assert split_template(template, "<s>", "</s>") is None
