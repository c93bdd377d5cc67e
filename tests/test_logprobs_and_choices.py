"""The engine's logprobs, prompt scoring, typical_p and lazy grammars, and several choices of one
request (services/choices.py), on the real model through LLMService (the HTTP shapes are the
OpenAI routes' tests')."""

from __future__ import annotations

import re
import threading
from types import SimpleNamespace

import pytest

from conftest import LONG, build_test_app, instances_in_use, wait_until
from services.choices import start_choices
from services.engine.batch_engine import PROMPT_LOGITS_ROWS
from services.engine.sampler import SamplerChain
from services.errors import InvalidRequest, TooBusy
from services.types import Finished, SamplingParams, Token

GREEDY = dict(temperature=0, repeat_penalty=1.0)
ROMAN = "The history of the Roman empire"     # greedy: "... expansion, and the struggle ..."
DIGITS_AFTER_THE = 'root ::= " the" [0-9]+'


@pytest.fixture(scope="module")
def backend(tmp_path_factory, model_file, model_registry):
    """One app (default settings) for the tests that need nothing of their own: each new app
    loads the model again."""
    # Seeded choices run one after another, each within QUEUE_TIMEOUT of the request: room for
    # a loaded test machine.
    app = build_test_app(tmp_path_factory.mktemp("logprobs"), model_file, model_registry,
                         QUEUE_TIMEOUT=120)
    yield app.extensions["llm"]
    app.extensions["llm"].close()


def backend_of(make_app, **settings):
    return make_app(**settings).extensions["llm"]


def run(backend, prompt, **sampling) -> tuple[list[Token], Finished]:
    stream = backend.llm.stream_prompt(None, prompt, SamplingParams(**sampling))
    events = list(stream)
    return events[:-1], events[-1]


def engine_of(backend):
    [(_, _, engine)] = backend.pool.engines()
    return engine


def test_greedy_logprobs_put_the_chosen_token_first_and_travel_with_its_text(backend):
    tokens, finished = run(backend, "Write a sentence about the sea:", max_tokens=12,
                           logprobs=3, **GREEDY)
    assert finished.usage.completion_tokens == len(finished.logprobs) == 12
    for entry in finished.logprobs:
        assert len(entry.top) == 3
        assert (entry.top[0].token, entry.top[0].logprob) == (entry.token, entry.logprob)
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top),
                                                        reverse=True)
        assert all(t.logprob <= 0 for t in entry.top) and entry.logprob <= 0
        assert entry.bytes == tuple(entry.token.encode("utf-8"))
    for token in tokens:                       # no stop strings: each piece is its tokens' text
        assert token.text == "".join(entry.token for entry in token.logprobs)
    assert [e for t in tokens for e in t.logprobs] == list(finished.logprobs)
    assert finished.text == "".join(entry.token for entry in finished.logprobs)


def test_logprobs_are_absent_unless_asked(backend):
    tokens, finished = run(backend, "Write a sentence about the sea:", max_tokens=8, **GREEDY)
    assert tokens and all(token.logprobs == () for token in tokens)
    assert finished.logprobs == () and finished.prompt_logprobs == ()


def test_a_stop_string_drops_its_tokens_with_its_text(backend):
    _, free = run(backend, ROMAN, max_tokens=12, logprobs=0, seed=3, **GREEDY)
    words = [entry.token for entry in free.logprobs]
    assert words[:4] == [" is", " a", " story", " of"]
    tokens, stopped = run(backend, ROMAN, max_tokens=12, logprobs=0, seed=3, stop=[" story"],
                          **GREEDY)
    assert stopped.text == " is a" and stopped.finish_reason == "stop"
    assert stopped.logprobs == free.logprobs[:2]
    assert [e for t in tokens for e in t.logprobs] == list(stopped.logprobs)


def test_prompt_logprobs_score_the_prompt_and_max_tokens_0_samples_nothing(backend):
    prompt = "Write a sentence about the sea:"
    tokens, scored = run(backend, prompt, max_tokens=0, logprobs=2, prompt_logprobs=True,
                         **GREEDY)
    assert tokens == [] and scored.text == "" and scored.finish_reason == "length"
    assert scored.usage.completion_tokens == 0
    assert len(scored.prompt_logprobs) == scored.usage.prompt_tokens == 8
    assert scored.prompt_logprobs[0] is None
    assert "".join(entry.token for entry in scored.prompt_logprobs[1:]) == prompt
    assert all(len(entry.top) == 2 and entry.logprob <= entry.top[0].logprob
               for entry in scored.prompt_logprobs[1:])
    # The prompt's last position scores what generation samples there: the same distribution
    # (seeded: evaluated alone from an empty cache, as a scored prompt is; a reused cached
    # prefix moves the last digits).
    _, generated = run(backend, prompt, max_tokens=1, logprobs=0, seed=1, **GREEDY)
    ids = engine_of(backend).llm.tokenize(prompt.encode(), add_bos=True, special=True)
    ids += engine_of(backend).llm.tokenize(generated.text.encode(), add_bos=False)
    _, rescored = run(backend, ids, max_tokens=0, prompt_logprobs=True, **GREEDY)
    assert len(rescored.prompt_logprobs) == len(ids)
    assert rescored.prompt_logprobs[-1].token == generated.logprobs[0].token
    assert rescored.prompt_logprobs[-1].logprob == pytest.approx(generated.logprobs[0].logprob,
                                                                 abs=1e-3)
    assert rescored.prompt_logprobs[-1].top == ()        # logprobs None: no alternatives


def test_a_prompt_longer_than_one_scoring_chunk_is_scored_at_every_position(backend):
    # Scored prompts are evaluated PROMPT_LOGITS_ROWS rows per step: the last row of each chunk
    # must keep its logits too (it scores the next chunk's first token).
    prompt = "The capital of France is Paris. " * 12
    _, scored = run(backend, prompt, max_tokens=0, logprobs=1, prompt_logprobs=True, **GREEDY)
    assert scored.usage.prompt_tokens > 2 * PROMPT_LOGITS_ROWS      # three chunks
    assert len(scored.prompt_logprobs) == scored.usage.prompt_tokens
    assert scored.prompt_logprobs[0] is None
    assert "".join(entry.token for entry in scored.prompt_logprobs[1:]) == prompt
    assert all(entry.logprob <= 0 and len(entry.top) == 1 for entry in scored.prompt_logprobs[1:])
    # By the second repeat the model knows what comes: the later sentences score higher.
    first, last = (sum(e.logprob for e in scored.prompt_logprobs[i:i + 8]) for i in (1, -8))
    assert last > first


def test_typical_p_is_applied_and_changes_nothing_when_greedy(backend):
    texts = {p: run(backend, ROMAN, max_tokens=16, seed=11, typical_p=p, **GREEDY)[1].text
             for p in (1.0, 0.2)}
    assert texts[1.0] == texts[0.2]
    sampled = [run(backend, ROMAN, max_tokens=16, seed=11, temperature=1.0, typical_p=p)[1].text
               for p in (1.0, 0.05, 0.05)]
    assert sampled[1] == sampled[2] != sampled[0]


def test_a_lazy_grammar_leaves_the_output_free_until_its_trigger(backend):
    _, free = run(backend, ROMAN, max_tokens=16, seed=1, **GREEDY)
    at = free.text.index(" the")
    _, lazy = run(backend, ROMAN, max_tokens=16, seed=1, grammar=DIGITS_AFTER_THE,
                  grammar_triggers=(" the",), **GREEDY)
    assert lazy.text[:at] == free.text[:at] and " the" not in lazy.text[:at]
    assert re.fullmatch(r" the[0-9]+", lazy.text[at:]), lazy.text
    # A trigger the output never reaches leaves it as free as no grammar.
    _, untriggered = run(backend, ROMAN, max_tokens=16, seed=1, grammar='root ::= "QQ" [0-9]+',
                         grammar_triggers=("QQ",), **GREEDY)
    assert untriggered.text == free.text
    # " of" holds the trigger " o" but the grammar refuses what follows it: not a trigger (the
    # engine goes on, where llama.cpp's own lazy grammar would abort the process).
    assert " of" in free.text
    _, refused = run(backend, ROMAN, max_tokens=16, seed=1, grammar='root ::= " o" [0-9]+',
                     grammar_triggers=(" o",), **GREEDY)
    assert refused.text == free.text


def test_a_trigger_the_grammar_cannot_continue_is_passed_over(backend):
    run(backend, "Hi", max_tokens=1)
    engine = engine_of(backend)
    params = SamplingParams(grammar=DIGITS_AFTER_THE, grammar_triggers=(" the",), **GREEDY)
    chain = SamplerChain(engine.vocab, params, [])
    try:
        assert chain.trigger(" theory") is False and chain.pending_grammar is not None
        assert chain.trigger(" the 1") is False
        assert chain.trigger(" the12") is True and chain.pending_grammar is None
    finally:
        chain.close()
    with pytest.raises(InvalidRequest, match="does not begin with its trigger"):
        run(backend, ROMAN, max_tokens=4, grammar=DIGITS_AFTER_THE, grammar_triggers=("the",))
    assert backend.concurrency.snapshot().in_flight == 0


def test_two_choices_of_one_prompt_decode_together_and_each_ends(make_app):
    backend = backend_of(make_app, MAX_CONCURRENT_REQUESTS=4)
    sampling = SamplingParams(max_tokens=16, temperature=0.7)
    choices = start_choices(backend.llm, None, [(ROMAN, sampling)] * 2)
    assert [s.prompt_tokens for s in choices.started] == [7, 7]
    finished = choices.collect()
    assert [f.usage.completion_tokens > 0 for f in finished] == [True, True]
    assert all(f.finish_reason in ("stop", "length") for f in finished)
    assert engine_of(backend).snapshot().widest_step >= 2
    one = start_choices(backend.llm, None, [(ROMAN, sampling)])
    seen = []
    for index, event in one:
        seen.append(index)
        assert not [t for t in threading.enumerate() if t.name.startswith("choice-")]
    assert set(seen) == {0} and isinstance(event, Finished)


def test_seeded_choices_give_the_texts_of_seed_and_seed_plus_one(backend):
    body = dict(max_tokens=12, temperature=0.9)
    singles = [run(backend, ROMAN, seed=seed, **body)[1].text for seed in (41, 42)]
    choices = start_choices(backend.llm, None, [(ROMAN, SamplingParams(seed=41, **body))] * 2)
    assert [f.text for f in choices.collect()] == singles
    assert singles[0] != singles[1]
    wrap = start_choices(backend.llm, None, [(ROMAN, SamplingParams(seed=2**32 - 1, **body))] * 2)
    assert wrap.collect()[1].text == run(backend, ROMAN, seed=0, **body)[1].text


def test_closing_the_choices_cancels_every_one(backend):
    sampling = SamplingParams(max_tokens=400, temperature=0)
    choices = start_choices(backend.llm, None, [(LONG["prompt"], sampling)] * 2)
    cancelled = backend.concurrency.snapshot().outcomes["cancelled"]
    events = iter(choices)
    seen = {next(events)[0] for _ in range(8)}
    assert seen <= {0, 1}
    assert instances_in_use(SimpleNamespace(backend=backend)) == 2
    events.close()
    assert wait_until(lambda: instances_in_use(SimpleNamespace(backend=backend)) == 0, 5)
    assert wait_until(lambda: backend.concurrency.snapshot().in_flight == 0, 5)
    assert backend.concurrency.snapshot().outcomes["cancelled"] == cancelled + 2


def test_a_choice_that_cannot_start_leaves_nothing_admitted(make_app):
    backend = backend_of(make_app, MAX_CONCURRENT_REQUESTS=1)
    with pytest.raises(TooBusy):
        start_choices(backend.llm, None, [(ROMAN, SamplingParams(max_tokens=8))] * 2)
    assert wait_until(lambda: backend.concurrency.snapshot().in_flight == 0, 5)
    assert wait_until(lambda: instances_in_use(SimpleNamespace(backend=backend)) == 0, 5)
    outcomes = backend.concurrency.snapshot().outcomes
    assert (outcomes["rejected"], outcomes["cancelled"], outcomes["succeeded"]) == (1, 1, 0)
    assert run(backend, ROMAN, max_tokens=4)[1].finish_reason in ("stop", "length")


class _Heard:
    """A sequence's listener and job: the pieces sent, each with its tokens' logprobs."""

    def __init__(self):
        self.sent = []

    def text(self, sequence, piece):
        self.sent.append((piece, [entry.token for entry in sequence.piece_logprobs]))

    def reserve(self): ...
    def start(self): ...
    def check_waiting(self): ...
    def check(self): ...


def fed(pieces, stop):
    from services.engine.sequence import Sequence
    from services.types import TokenLogprob

    heard = _Heard()
    sequence = Sequence([1], SamplingParams(stop=stop, logprobs=0), 64, heard, heard)
    for i, piece in enumerate(pieces):
        if sequence.accept(i, piece.encode(), False, TokenLogprob(piece, -1.0, ())):
            break
    else:
        sequence.flush()
    return heard.sent, [entry.token for entry in sequence.logprobs]


def test_text_held_back_for_a_stop_string_carries_its_tokens_when_sent():
    sent, logprobs = fed(["Hello", " E", "xtra", "!"], stop=["END"])
    # " E" ends in a possible stop: its "E" waits, and the token goes with the piece ending it.
    assert sent == [("Hello", ["Hello"]), (" ", []), ("Extra", [" E", "xtra"]), ("!", ["!"])]
    assert logprobs == ["Hello", " E", "xtra", "!"]
    sent, logprobs = fed(["Hello", " E", "ND", "more"], stop=["END"])
    assert sent == [("Hello", ["Hello"]), (" ", [])] and logprobs == ["Hello"]
    sent, logprobs = fed(["Hi", "END"], stop=["END"])
    assert sent == [("Hi", ["Hi"])] and logprobs == ["Hi"]
