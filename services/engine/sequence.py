"""One request's generation as the batched engine sees it: its prompt, its sampler chain, the
text it has produced, and how it reports back.

Everything here runs on the engine's scheduler thread, except the constructor. The owner of a
sequence hears of it through a `SequenceListener`; the job it belongs to (see
`concurrency_manager.Job`) tells the engine when to stop it.
"""

from __future__ import annotations

import codecs
import time
from typing import Protocol, Sequence as Tokens

from services.engine.sampler import SamplerChain
from services.errors import InvalidRequest
from services.types import SamplingParams, TokenLogprob


class JobControl(Protocol):
    """What the engine needs of the job a sequence runs for."""

    def reserve(self) -> None:
        """A slot is set aside: the queue wait is over (raises if the caller gave up)."""

    def start(self) -> None:
        """Generation proper begins; REQUEST_TIMEOUT counts from here."""

    def check_waiting(self) -> None:
        """Raise when a queued sequence should be dropped (cancelled, queue deadline passed)."""

    def check(self) -> None:
        """Raise when a running sequence should stop (cancelled, REQUEST_TIMEOUT passed)."""


class SequenceListener(Protocol):
    def admitted(self, sequence: "Sequence") -> None:
        """The sequence holds a slot; what of its prompt was cached is known."""

    def text(self, sequence: "Sequence", piece: str) -> None:
        """Text that can go to the client (stop strings held back until ruled out); when the
        request asked for logprobs, `sequence.piece_logprobs` holds those of the tokens whose
        text this piece completes."""

    def ended(self, sequence: "Sequence", error: BaseException | None) -> None:
        """The sequence is over: finished (error None) or stopped by `error`; its slot is free."""


class Sequence:
    """A prompt to continue under `params`, at most `limit` positions long (its n_ctx)."""

    def __init__(self, tokens: Tokens[int], params: SamplingParams, limit: int,
                 job: JobControl, listener: SequenceListener):
        self.tokens = list(tokens)
        self.params = params
        self.job = job
        self.listener = listener
        room = limit - len(self.tokens)
        # 0 is a request to score the prompt only: it ends after the prompt, nothing sampled.
        self.max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        # KV cells it may fill: its prompt and every token it may still generate.
        self.reserve = len(self.tokens) + self.max_new
        self.sampler: SamplerChain | None = None
        self.n_past = 0                  # positions already in the KV cache
        self.pending: int | None = None  # sampled, not yet evaluated
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.pieces: list[str] = []
        self.first_token_at: float | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        # Logprobs, when asked: each sent token's, those of the piece being sent, and those of
        # tokens whose text is not all sent yet, with where their text ends (in characters of
        # the output: `_decoded` of them so far, `_sent` of them sent).
        self.logprobs: list[TokenLogprob] = []
        self.piece_logprobs: tuple[TokenLogprob, ...] = ()
        self.prompt_logprobs: list[TokenLogprob | None] = [None]
        self._unsent: list[tuple[int, TokenLogprob]] = []
        self._decoded = self._sent = 0
        # While a lazy grammar waits: the output so far, and where a trigger may still begin.
        self._output = ""
        self._scan_from = 0

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.tokens)

    def accept(self, token: int, piece: bytes, end_of_generation: bool,
               logprob: TokenLogprob | None = None) -> bool:
        """Take a sampled token (and its logprob, when asked); True when the sequence is
        finished."""
        if end_of_generation:
            self.finish_reason = "stop"
            return True
        self.completion_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        new = self._decoder.decode(piece)
        self._decoded += len(new)
        if logprob is not None:
            self._unsent.append((self._decoded, logprob))
        waiting = self.sampler is not None and self.sampler.pending_grammar is not None
        if waiting:
            self._output += new
        ready, self._held, stopped = split_at_stop(self._held + new, self.params.stop)
        if stopped:
            self._held = ""
            self._decoder.reset()
            self._emit(ready, final=True)
            self.finish_reason = "stop"
            return True
        self._emit(ready)
        if waiting:
            self._watch_triggers()
        if self.completion_tokens >= self.max_new:
            self.finish_reason = "length"
            return True
        self.pending = token
        return False

    def flush(self) -> None:
        """Send text held back for a stop string that never came, and any partial character."""
        self._emit(self._held + self._decoder.decode(b"", final=True), final=True)
        self._held = ""

    def _emit(self, text: str, final: bool = False) -> None:
        """Send `text` with the logprobs of the tokens whose text it completes. `final`: nothing
        follows; tokens whose text is not all sent (a stop string's) are dropped with it."""
        if not text and not final:
            return
        self._sent += len(text)
        if self._unsent:
            done = [item for item in self._unsent if item[0] <= self._sent]
            self._unsent = [] if final else self._unsent[len(done):]
            self.piece_logprobs = tuple(logprob for _, logprob in done)
            self.logprobs.extend(self.piece_logprobs)
        if text:
            self.pieces.append(text)
            self.listener.text(self, text)
        self.piece_logprobs = ()

    def _watch_triggers(self) -> None:
        """Give the waiting grammar the output from the first trigger in it on; an occurrence
        the grammar refuses is passed over. Not while a character is incomplete: the grammar
        must see whole characters, the bytes it will be fed after."""
        if self._decoder.getstate()[0]:
            return
        triggers, output = self.params.grammar_triggers, self._output
        while True:
            found = [at for at in (output.find(t, self._scan_from) for t in triggers) if at >= 0]
            if not found:
                longest = max(len(t) for t in triggers)
                self._scan_from = max(self._scan_from, len(output) - longest + 1)
                return
            if self.sampler.trigger(output[min(found):]):
                return
            self._scan_from = min(found) + 1

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None


def split_at_stop(text: str, stops: Tokens[str]) -> tuple[str, str, bool]:
    """Split pending text into (safe to send, to hold back, a stop string was reached)."""
    if not stops:
        return text, "", False
    hits = [text.index(stop) for stop in stops if stop in text]
    if hits:
        return text[: min(hits)], "", True
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return text[: len(text) - hold], text[len(text) - hold:], False


def common_prefix(a: Tokens[int], b: Tokens[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def check_token_ids(ids: Tokens[int], n_vocab: int) -> list[int]:
    """:raise InvalidRequest: an id that is not one of the model's tokens (llama.cpp would fail
    to decode it)."""
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"prompt[{bad}] = {ids[bad]} is not a token id of this model "
                             f"(0 .. {n_vocab - 1})", param="prompt")
    return list(ids)
