"""Separate a reasoning model's `<think>…</think>` from its answer, as the text streams in.

Tags arrive cut across tokens ("<", "think", ">"), so text that could still become a tag is held
back until it is known either way; nothing else is delayed. DeepSeek-R1's newer chat template
opens the `<think>` block in the prompt itself, so the output may start inside reasoning.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"

Part = tuple[str, str]   # ("text" | "reasoning", piece)


class ReasoningSplitter:
    """Feed text pieces in order; get ("text" | "reasoning", piece) parts back in order.

    Whitespace right after a tag is dropped (the model writes "</think>\\n\\n" before its
    answer); everything else arrives exactly once, in one kind or the other.
    """

    def __init__(self, thinking: bool = False):
        self.thinking = thinking
        self._held = ""
        self._after_tag = thinking

    def feed(self, text: str) -> list[Part]:
        """The parts that are certain once `text` is added."""
        self._held += text
        parts: list[Part] = []
        while True:
            if self._after_tag:
                self._held = self._held.lstrip()
                if not self._held:
                    return parts
                self._after_tag = False
            tag = CLOSE if self.thinking else OPEN
            found = self._held.find(tag)
            if found < 0:
                keep = _partial_tag(self._held, tag)
                self._emit(parts, self._held[:len(self._held) - keep])
                self._held = self._held[len(self._held) - keep:]
                return parts
            self._emit(parts, self._held[:found])
            self._held = self._held[found + len(tag):]
            self.thinking = not self.thinking
            self._after_tag = True

    def flush(self) -> list[Part]:
        """What is still held back at the end of the text (a tag that never completed)."""
        parts: list[Part] = []
        self._emit(parts, self._held)
        self._held = ""
        return parts

    def _emit(self, parts: list[Part], text: str) -> None:
        if text:
            parts.append(("reasoning" if self.thinking else "text", text))


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def split_reasoning(text: str, thinking: bool = False) -> tuple[str, str]:
    """(answer, reasoning) of a whole text."""
    splitter = ReasoningSplitter(thinking)
    parts = splitter.feed(text) + splitter.flush()
    return ("".join(p for kind, p in parts if kind == "text"),
            "".join(p for kind, p in parts if kind == "reasoning"))
