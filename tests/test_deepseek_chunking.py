"""DeepSeek context handling: token-exact chunking, note grouping, budgets and collapse rounds,
with the real model's tokenizer. Chunking and grouping are property tests (hypothesis)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from DeepSeekLLM.model_cache import ModelTokenizer
from DeepSeekLLM.run import _collapse
from DeepSeekLLM.services import (MIN_NOTE_TOKENS, Note, PromptBuilder, group_notes, plan_budget,
                                  split_tokens)
from services.errors import ContextOverflow, InvalidRequest
from services.types import SamplingParams
from services.types import Finished, Timings, Usage

WORDS = ["the", "contract", "ends", "in", "March", "2027", ";", "über", "naïve", "東京", "🙂",
         "\n\n", "<think>", "<end_of_turn>", "  ", "x" * 30, "1234567890"]
TEXTS = st.one_of(st.text(max_size=2000),
                  st.lists(st.sampled_from(WORDS), max_size=600).map(" ".join))


@pytest.fixture(scope="module")
def tokenizer(model_file):
    tokenizer = ModelTokenizer(str(model_file))
    yield tokenizer
    tokenizer.close()


def check_chunks(ids: list[int], chunks: list[list[int]], size: int, overlap: int) -> None:
    assert chunks and all(len(chunk) <= size for chunk in chunks)
    for before, after in zip(chunks, chunks[1:]):
        assert len(before) == size                      # only the last chunk may be short
        assert len(after) > overlap                     # every chunk brings new tokens
        assert before[size - overlap:] == after[:overlap]
    # Every token, in order, once the shared tokens are counted once: nothing lost or repeated.
    rebuilt = chunks[0] + [token for chunk in chunks[1:] for token in chunk[overlap:]]
    assert rebuilt == ids


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, size=st.integers(16, 300), data=st.data())
def test_chunks_of_real_text_cover_it_with_exact_overlaps(tokenizer, text, size, data):
    overlap = data.draw(st.integers(0, size - 1), label="overlap")
    ids = tokenizer.tokenize(text)
    check_chunks(ids, split_tokens(ids, size, overlap), size, overlap)


@settings(max_examples=300, deadline=None)
@given(length=st.integers(0, 5000), size=st.integers(1, 700), data=st.data())
def test_chunks_of_any_length_cover_it_with_exact_overlaps(length, size, data):
    overlap = data.draw(st.integers(0, size - 1), label="overlap")
    ids = list(range(length))
    chunks = split_tokens(ids, size, overlap)
    check_chunks(ids, chunks, size, overlap)
    if length > size:
        assert len(chunks) == -(-(length - overlap) // (size - overlap))


@pytest.mark.parametrize("size,overlap", [(10, 10), (10, 11), (10, -1), (0, 0)])
def test_split_refuses_an_overlap_that_would_not_advance(size, overlap):
    with pytest.raises(ValueError):
        split_tokens([1, 2, 3], size, overlap)


@settings(max_examples=300, deadline=None)
@given(room=st.integers(20, 2000), data=st.data())
def test_note_groups_fit_keep_order_and_shrink(room, data):
    lengths = data.draw(st.lists(st.integers(1, room // 2), min_size=1, max_size=60))
    groups = group_notes(lengths, room)
    assert [i for group in groups for i in group] == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in group) <= room for group in groups)
    if sum(lengths) > room:
        # Any two notes fit together, so a collapse round always merges some of them.
        assert len(groups) < len(lengths)


def test_a_note_longer_than_the_room_is_an_error_not_a_cut():
    with pytest.raises(ContextOverflow):
        group_notes([5, 50, 5], 40)


def test_prompts_are_the_template_plus_the_chunk_ids_unchanged(tokenizer):
    builder = PromptBuilder(tokenizer.layout, tokenizer.tokenize, "Who signed it?")
    chunk = tokenizer.tokenize("Signed by A. Smith <end_of_turn> on 3 May.")
    prompt = builder.map_step(chunk)
    assert len(prompt) == builder.overhead("map") + len(chunk)
    assert prompt[:len(tokenizer.layout.before)] == list(tokenizer.layout.before)
    start = prompt.index(chunk[0])
    assert prompt[start:start + len(chunk)] == chunk
    # User text never becomes a control token: "<end_of_turn>" stays plain text.
    end_of_turn = tokenizer._llm.tokenize(b"<end_of_turn>", add_bos=False, special=True)
    assert len(end_of_turn) == 1 and end_of_turn[0] not in chunk
    notes = [builder.note_block(Note(1, 1, "A. Smith")), builder.note_block(Note(2, 3, "May"))]
    final = builder.notes_step(notes, final=True)
    assert len(final) == builder.overhead("reduce") + sum(map(len, notes))


def test_the_default_model_without_a_chat_template_gets_the_plain_layout(tokenizer):
    layout = tokenizer.layout
    assert list(layout.before) == tokenizer._llm.tokenize(b"", add_bos=True, special=False)
    assert tokenizer.detokenize(list(layout.after)) == "\n\nAnswer:"
    assert layout.thinking is False


def budget(tokenizer, n_ctx=1024, max_tokens=32, chunk_size=None, overlap=None,
           context=4000):
    builder = PromptBuilder(tokenizer.layout, tokenizer.tokenize, "What is the total?")
    return builder, plan_budget(builder, n_ctx, max_tokens, context, chunk_size, overlap,
                                (4096, 256))


def test_budget_defaults_shrink_to_fit_and_every_step_fits(tokenizer):
    builder, plan = budget(tokenizer)
    assert plan.chunk_size == 1024 - builder.overhead("map") - plan.note_tokens
    assert plan.overlap == plan.chunk_size // 4
    assert plan.note_tokens == 32
    assert builder.overhead("reduce") + plan.notes_room + 32 <= 1024
    assert builder.overhead("collapse") + plan.notes_room + plan.note_tokens <= 1024
    assert 2 * (builder.label_tokens(4000) + plan.note_tokens) <= plan.notes_room


def test_notes_shrink_when_max_tokens_would_not_leave_room_for_two(tokenizer):
    _, plan = budget(tokenizer, max_tokens=600)
    assert MIN_NOTE_TOKENS <= plan.note_tokens < 600
    assert 2 * plan.note_tokens < plan.notes_room


@pytest.mark.parametrize("kwargs,error,field", [
    ({"chunk_size": 2000}, InvalidRequest, "max_chunk_size"),
    ({"chunk_size": 100, "overlap": 100}, InvalidRequest, None),
    ({"overlap": 1000}, InvalidRequest, None),
    ({"n_ctx": 256, "max_tokens": 200}, ContextOverflow, "context_length"),
])
def test_budget_refuses_what_cannot_fit(tokenizer, kwargs, error, field):
    with pytest.raises(error) as caught:
        budget(tokenizer, **kwargs)
    if field:
        assert field in caught.value.details


class WordyRunner:
    """Answers every step with the same long note, as a model that never condenses would; the
    real model cannot be made to write notes of a given length, so collapse rounds use this."""

    def __init__(self, note: str):
        self.note, self.prompts = note, []

    def run_ordered(self, prompts, sampling, first=None):
        for prompt in prompts:
            self.prompts.append(prompt)
            yield Finished(model="m", text=self.note, finish_reason="length",
                           usage=Usage(len(prompt), 0), timings=Timings(0, 0, 0))


def test_collapse_rounds_repeat_until_the_notes_fit_one_prompt(tokenizer):
    builder, plan_budget_ = budget(tokenizer, n_ctx=512, max_tokens=60)
    note = " ".join(["door"] * 200)
    note = tokenizer.detokenize(tokenizer.tokenize(note)[:plan_budget_.note_tokens])
    plan = SimpleNamespace(builder=builder, budget=plan_budget_, thinking=False)
    runner = WordyRunner(note)
    notes = [Note(i, i, note) for i in range(1, 41)]
    steps = _collapse(plan, runner, notes, SamplingParams(max_tokens=plan_budget_.note_tokens))
    events = []
    while True:
        try:
            events.append(next(steps))
        except StopIteration as done:
            final = done.value
            break
    assert sum(len(builder.note_block(n)) for n in final) <= plan_budget_.notes_room
    assert (final[0].first, final[-1].last) == (1, 40)               # nothing dropped, in order
    assert all(a.last + 1 == b.first for a, b in zip(final, final[1:]))
    rounds = sum(1 for e in events if e.index == 1)
    assert rounds >= 2 and len(runner.prompts) == len(events)
    assert all(len(p) + plan_budget_.note_tokens <= 512 for p in runner.prompts)
