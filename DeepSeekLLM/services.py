"""Context handling for inputs larger than a context window: token-exact chunks and budgets.

Everything here counts in the model's own token ids, and every step's prompt is assembled from
ids (chat-template pieces, instruction text, the user's prompt, a chunk's ids as they are), so
the count planned here is the count llama.cpp is given. A chunk is never detokenized and
tokenized again, which could change its length. User text is tokenized with special tokens
off, so a document cannot smuggle in control tokens such as an end of turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from services.errors import ContextOverflow, InvalidRequest

Tokenize = Callable[[str], list[int]]

# The smallest note worth taking, and the smallest chunk worth a map step.
MIN_NOTE_TOKENS = 16
MIN_CHUNK_TOKENS = 32

_DOCUMENT = ("Document:\n", "\n\nUsing the document above, respond to this request: ")
_MAP = ("Here is one part of a longer document:\n\n",
        "\n\nWrite short notes on everything in this part that helps with the request below; "
        "if nothing does, write \"Nothing relevant.\"\nRequest: ")
_COLLAPSE = ("Here are notes taken from consecutive parts of a document:\n\n",
             "Merge these notes into one shorter set of notes, keeping everything that helps "
             "with the request below.\nRequest: ")
_REDUCE = ("Here are notes taken from the parts of a document, in order:\n\n",
           "Using these notes, respond to this request: ")


def split_tokens(ids: Sequence[int], chunk_size: int, overlap: int) -> list[list[int]]:
    """Chunks of at most `chunk_size` ids, in order, neighbours sharing exactly `overlap` ids.

    Every id lies in some chunk; the last chunk starts one step after its predecessor, so it
    always holds ids no other chunk has.
    :raise ValueError: not 0 <= overlap < chunk_size.
    """
    if not 0 <= overlap < chunk_size:
        raise ValueError("need 0 <= overlap < chunk_size")
    step, chunks, start = chunk_size - overlap, [], 0
    while True:
        chunks.append(list(ids[start:start + chunk_size]))
        if start + chunk_size >= len(ids):
            return chunks
        start += step


def count_chunks(n_ids: int, chunk_size: int, overlap: int) -> int:
    """How many chunks `split_tokens` makes, without making them (a tiny chunk_size with a
    large overlap plans millions from one request body)."""
    if n_ids <= chunk_size:
        return 1
    return 1 + -(-(n_ids - chunk_size) // (chunk_size - overlap))


def group_notes(lengths: Sequence[int], room: int) -> list[list[int]]:
    """Consecutive runs of note indexes whose lengths add up to at most `room`, order kept.

    :raise ContextOverflow: one note alone is longer than `room`.
    """
    groups: list[list[int]] = []
    total = room + 1
    for index, length in enumerate(lengths):
        if length > room:
            raise ContextOverflow(f"a note of {length} tokens outgrew the {room} tokens left for "
                                  f"notes; raise n_ctx or lower max_tokens")
        if total + length > room:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += length
    return groups


@dataclass(frozen=True)
class ChatLayout:
    """One user turn of a model's chat template, as the token ids around the message."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    thinking: bool = False      # the generation prompt itself opens a <think> block


@dataclass(frozen=True)
class Note:
    """What a map or collapse step wrote about chunks `first`..`last` (counted from 1)."""

    first: int
    last: int
    text: str


class PromptBuilder:
    """Every step's prompt for one request, as token ids, and each kind's fixed overhead."""

    def __init__(self, layout: ChatLayout, tokenize: Tokenize, prompt: str):
        self._layout, self._tokenize = layout, tokenize
        self._request = tokenize(prompt)
        self._kinds = {kind: (tokenize(head), tokenize(tail) + self._request)
                       for kind, (head, tail) in (("document", _DOCUMENT), ("map", _MAP),
                                                  ("collapse", _COLLAPSE), ("reduce", _REDUCE))}

    def overhead(self, kind: str) -> int:
        """Tokens a prompt of this kind takes besides its body (document, chunk or notes)."""
        head, tail = self._kinds[kind]
        return len(self._layout.before) + len(head) + len(tail) + len(self._layout.after)

    def single(self, context: Sequence[int]) -> list[int]:
        """The one prompt of a request that fits: the document (if any), then the request."""
        if not context:
            return [*self._layout.before, *self._request, *self._layout.after]
        return self._wrap("document", context)

    def map_step(self, chunk: Sequence[int]) -> list[int]:
        return self._wrap("map", chunk)

    def notes_step(self, blocks: Sequence[Sequence[int]], final: bool) -> list[int]:
        """A collapse prompt, or with `final` the reduce prompt, over note blocks."""
        return self._wrap("reduce" if final else "collapse", [i for b in blocks for i in b])

    def note_block(self, note: Note) -> list[int]:
        """A note as it appears among others: labelled with the parts it covers."""
        parts = (f"Part {note.first}" if note.first == note.last
                 else f"Parts {note.first}-{note.last}")
        return self._tokenize(f"[{parts}]\n{note.text.strip() or 'Nothing relevant.'}\n\n")

    def label_tokens(self, parts: int) -> int:
        """An upper bound on a note label's tokens when there are at most `parts` parts."""
        return len(self._tokenize(f"[Parts {parts}-{parts}]\n\n\n"))

    def _wrap(self, kind: str, body: Sequence[int]) -> list[int]:
        head, tail = self._kinds[kind]
        return [*self._layout.before, *head, *body, *tail, *self._layout.after]


@dataclass(frozen=True)
class Budget:
    """How the steps of one chunked request share its context window."""

    note_tokens: int     # most tokens a map or collapse step may write
    notes_room: int      # most note tokens a collapse or reduce prompt may hold
    chunk_size: int
    overlap: int


def plan_budget(builder: PromptBuilder, n_ctx: int, max_tokens: int, context_tokens: int,
                chunk_size: int | None, overlap: int | None,
                defaults: tuple[int, int]) -> Budget:
    """Fit the map, collapse and reduce steps into n_ctx; defaults shrink to fit, requests don't.

    Notes get at most half of the notes room each (less a label and a margin for text that
    tokenizes a little longer when read back), so any two fit one prompt and every collapse
    round at least halves the notes.
    :raise ContextOverflow: the prompt and max_tokens leave too little room to chunk at all.
    :raise InvalidRequest: chunk_size does not fit, or chunk_overlap is not below chunk_size.
    """
    notes_room = n_ctx - max(builder.overhead("collapse"), builder.overhead("reduce")) - max_tokens
    text_room = notes_room // 2 - builder.label_tokens(context_tokens)
    note_tokens = min(max_tokens, (text_room - 4) * 9 // 10)
    chunk_limit = n_ctx - builder.overhead("map") - note_tokens
    if note_tokens < MIN_NOTE_TOKENS or chunk_limit < MIN_CHUNK_TOKENS:
        raise ContextOverflow(
            f"the context does not fit n_ctx ({n_ctx} tokens) and the prompt with max_tokens "
            f"({max_tokens}) leaves too little room to chunk it; raise n_ctx, lower max_tokens "
            f"or shorten the prompt", context_tokens=context_tokens, max_tokens=max_tokens,
            context_length=n_ctx)
    if chunk_size is None:
        chunk_size = min(defaults[0], chunk_limit)
    elif chunk_size > chunk_limit:
        raise InvalidRequest(
            f"chunk_size {chunk_size} does not fit: with this prompt, max_tokens and n_ctx a "
            f"chunk can hold at most {chunk_limit} tokens", chunk_size=chunk_size,
            max_chunk_size=chunk_limit)
    if overlap is None:
        overlap = min(defaults[1], chunk_size // 4)
    elif overlap >= chunk_size:
        raise InvalidRequest(f"chunk_overlap ({overlap}) must be smaller than chunk_size "
                             f"({chunk_size})")
    return Budget(note_tokens=note_tokens, notes_room=notes_room, chunk_size=chunk_size,
                  overlap=overlap)
