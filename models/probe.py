"""A model file's trial: do, in a throwaway process, what serving will do with the file.

llama.cpp aborts the whole process on some well-formed files (a vocabulary without byte tokens
throws std::out_of_range from llama_vocab::byte_to_token on the first character it lacks), so no
file is loaded by the server until `python -m models.probe PATH N_CTX N_BATCH` has survived:
loading it with the serving settings; tokenizing every byte value and text from every Unicode
plane (combining marks, emoji, NUL, invalid UTF-8) with and without special-token parsing;
detokenizing every vocabulary id; evaluating a prompt and sampling, plain and under the JSON
grammar; rendering and tokenizing a chat through its template; and a load with embeddings on
plus one embedding. Each step is announced on stdout before it runs, so when the child dies the
parent can say where. `SubprocessTrial` runs it and turns a crash, a hang or an exception into
`UnloadableModel`.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

from services.errors import ModelLoadError, ShuttingDown, UnloadableModel


class TrialNotRun(ModelLoadError):
    """The trial itself could not start (the server's own fault): nothing is known of the file."""

# Bump when the trial covers more: records from an older trial are tried again.
TRIAL_VERSION = 4
STEP = "step: "
HARNESS_FAILED = 3     # the child's exit status when it could not even start the trial
# Real chat templates (tool-calling ones are ~20 KB) compile in milliseconds and a few MiB.
COMPILE_SECONDS = 10
COMPILE_MEMORY_BYTES = 256 * 1024**2

_INVALID_UTF8 = (b"\x80", b"\xbf\x80", b"\xc0\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80",
                 b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xff\xfe\xfd",
                 b"a\x00b", b"\x00" * 8)
_SPECIAL_LOOKALIKES = ("<s></s><unk><pad><mask>[INST][/INST]<|im_start|>user<|im_end|>"
                       "<start_of_turn>model<end_of_turn><|endoftext|><|eot_id|><think></think>"
                       "<0x41><0xFF><0x00>")
SAMPLE_TEXT = ("Hello, wörld! Ünïcödé 你好 مرحبا שלום Привет 🙂👍🏽👨‍👩‍👧 e\u0301\u0308\u20dd "
               "\u200b\u200d\ufeff\ufffd\x00\t\r\n 1234 {\"json\": [1, 2.5e-3, null]}")


def unicode_samples() -> list[str]:
    """Text from every plane: a stride through all code points (no surrogates: they cannot be
    encoded, and the HTTP layer refuses them), the ends of each plane, combining marks, emoji."""
    points = [cp for cp in range(0, 0x110000, 97) if not 0xD800 <= cp < 0xE000]
    points += [plane * 0x10000 + end for plane in range(17) for end in (0, 0xFFFD, 0xFFFE, 0xFFFF)]
    points += list(range(0x300, 0x370)) + list(range(0x1F300, 0x1F700, 3))
    text = "".join(map(chr, points))
    return [text[i:i + 512] for i in range(0, len(text), 512)] + [SAMPLE_TEXT, _SPECIAL_LOOKALIKES]


def step(description: str) -> None:
    print(f"{STEP}{description}", flush=True)


def _tokenize_everything(llm) -> None:
    for special in (False, True):
        for value in range(256):
            step(f"tokenizing byte 0x{value:02x} (special={special})")
            llm.tokenize(bytes([value]), add_bos=True, special=special)
        for raw in _INVALID_UTF8:
            step(f"tokenizing invalid UTF-8 {raw!r} (special={special})")
            llm.tokenize(raw, add_bos=False, special=special)
        for index, text in enumerate(unicode_samples()):
            step(f"tokenizing Unicode sample {index} (special={special})")
            llm.tokenize(text.encode("utf-8"), add_bos=True, special=special)


def _detokenize_every_token(llm) -> None:
    n_vocab = llm.n_vocab()
    for special in (False, True):
        for start in range(0, n_vocab, 4096):
            step(f"detokenizing ids {start}..{min(n_vocab, start + 4096) - 1} (special={special})")
            llm.detokenize(list(range(start, min(n_vocab, start + 4096))), special=special)
    step("detokenizing the BOS and EOS tokens")
    for token in (llm.token_bos(), llm.token_eos()):
        if token >= 0:
            llm.detokenize([token], special=True)


class _TrialJob:
    """The job a trial sequence runs for: never cancelled, no deadlines (the trial has its own)."""

    def reserve(self) -> None: ...
    def start(self) -> None: ...
    def check_waiting(self) -> None: ...
    def check(self) -> None: ...


class _TrialListener:
    def __init__(self):
        self.done = threading.Event()
        self.error: BaseException | None = None

    def admitted(self, sequence) -> None: ...
    def text(self, sequence, piece: str) -> None: ...

    def ended(self, sequence, error: BaseException | None) -> None:
        self.error = error
        self.done.set()


def _generate(llm, n_ctx: int, n_batch: int) -> None:
    """Prompts evaluated and a few tokens sampled and detokenized by serving's batched engine:
    a plain and a JSON-grammar sequence decoded together in one context."""
    from services.dialects.json_mode import any_json_object
    from services.engine.batch_engine import BatchEngine, EngineSettings
    from services.engine.sequence import Sequence
    from services.types import SamplingParams

    step("evaluating prompts and sampling in the batched engine (plain and JSON grammar)")
    engine = BatchEngine(llm, EngineSettings(slots=2, kv_cells=n_ctx, n_ctx=n_ctx // 2,
                                             n_batch=n_batch, n_threads=1), "trial")
    tokens = llm.tokenize(SAMPLE_TEXT.encode("utf-8"), add_bos=True, special=True)
    tokens = tokens[: max(1, n_ctx // 2 - 8)]
    listeners = []
    for grammar in (None, any_json_object()):
        listener = _TrialListener()
        engine.submit(Sequence(tokens, SamplingParams(max_tokens=4, seed=None, grammar=grammar),
                               n_ctx // 2, _TrialJob(), listener))
        listeners.append(listener)
    for listener in listeners:
        listener.done.wait()
        if listener.error is not None:
            raise listener.error
    engine.close()


def _chat(llm) -> None:
    """The chat template rendered by serving's renderer and tokenized as the chat endpoints do;
    a template that only raises is answered per request (4xx) and does not fail the trial."""
    from services.dialects.chat import ChatMessage, render_template
    from services.errors import BackendError

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return
    step("rendering and tokenizing a chat through the model's template")
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", SAMPLE_TEXT),
                ChatMessage("assistant", "🙂"), ChatMessage("user", _SPECIAL_LOOKALIKES))
    bos, eos = (llm.detokenize([token], special=True).decode("utf-8", errors="replace")
                if token >= 0 else "" for token in (llm.token_bos(), llm.token_eos()))
    try:
        text = render_template(template, messages, bos, eos)
    except BackendError as exc:
        print(f"note: the chat template is refused per request: {exc.message}", flush=True)
        return
    llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def _compile_templates(path: str) -> None:
    """Every chat template in the file compiled as llama-cpp-python compiles them when it loads
    the model, before it does: Jinja computes constant expressions while compiling, so
    `{{ 10 ** 10 ** 10 }}` would hang every load and `{{ 'x' * 10 ** 9 }}` fill memory in it.
    A compile still running after COMPILE_SECONDS ends this process (SIGALRM's default action
    works even inside one long C-level operation); one that grows it by more than
    COMPILE_MEMORY_BYTES fails the trial."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from models.gguf_header import read_gguf

    for key, value in read_gguf(path).metadata.items():
        if key.startswith("tokenizer.chat_template") and isinstance(value, str):
            step(f"compiling the chat template {key}")
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            signal.alarm(COMPILE_SECONDS)
            Jinja2ChatFormatter(template=value, eos_token="", bos_token="")
            signal.alarm(0)
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
            if grown > COMPILE_MEMORY_BYTES:
                raise SystemExit(f"compiling the chat template {key} took {grown >> 20} MiB "
                                 f"of memory, more than {COMPILE_MEMORY_BYTES >> 20} MiB")


def main(path: str, n_ctx: int, n_batch: int) -> int:
    try:     # the serving code the trial drives: a failure here is the server's, not the file's
        import services.dialects.chat  # noqa: F401
        import services.engine.batch_engine  # noqa: F401
        import services.dialects.json_mode  # noqa: F401
        from services.embeddings import embedding_loader
        from services.model_loading import InstanceSettings, close_instance, llamacpp_loader
    except Exception as exc:
        print(f"the trial cannot run: {exc!r}", file=sys.stderr)
        return HARNESS_FAILED
    settings = InstanceSettings(n_ctx=n_ctx, n_batch=n_batch, n_threads=1, n_gpu_layers=0)
    _compile_templates(path)
    step(f"loading the model (n_ctx={n_ctx}, n_batch={n_batch})")
    instance = llamacpp_loader(settings)(path)
    llm = instance.client
    _tokenize_everything(llm)
    _detokenize_every_token(llm)
    _generate(llm, n_ctx, n_batch)
    _chat(llm)
    close_instance(instance)
    step("loading the model with embeddings on and embedding a text")
    embedder = embedding_loader(settings, n_ctx)(path)
    embedder.client.embed(SAMPLE_TEXT, normalize=True, truncate=True)
    close_instance(embedder)
    step("done")
    return 0


def _limit_child() -> None:
    """In the child: no core dump of a big process, and the first the OOM killer picks."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


class SubprocessTrial:
    """Runs the trial of a file in a child process; `cancel` kills running children."""

    def __init__(self, timeout: float = 300, n_ctx: int = 4096, n_batch: int = 512):
        self.timeout, self.n_ctx, self.n_batch = timeout, n_ctx, n_batch
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._cancelled = False

    def __call__(self, path: Path) -> None:
        """:raise UnloadableModel: the child crashed, failed or ran past the timeout.
        :raise ShuttingDown: `cancel` was called; nothing is known about the file.
        :raise TrialNotRun: the child could not start the trial; nothing is known either.
        """
        child = self._start(path)
        try:
            out, err = child.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            raise UnloadableModel(f"the trial did not finish within {self.timeout:g} s "
                                  f"({_last_step(out)})") from None
        finally:
            with self._lock:
                self._children.discard(child)
        if self._cancelled:
            raise ShuttingDown("the server is shutting down; the trial was stopped")
        if child.returncode == HARNESS_FAILED:
            raise TrialNotRun(f"the trial could not run: {err.strip()[-300:]}")
        if child.returncode != 0:
            raise UnloadableModel(_reason(child.returncode, out, err))

    def _start(self, path: Path) -> subprocess.Popen:
        with self._lock:
            if self._cancelled:
                raise ShuttingDown("the server is shutting down; the trial did not run")
            child = subprocess.Popen(
                [sys.executable, "-m", "models.probe", str(path), str(self.n_ctx), str(self.n_batch)],
                cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, errors="replace", preexec_fn=_limit_child,
                env={**os.environ, "GGML_NO_BACKTRACE": "1"})
            self._children.add(child)
        return child

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            for child in self._children:
                child.kill()


def _last_step(out: str) -> str:
    steps = [line[len(STEP):] for line in out.splitlines() if line.startswith(STEP)]
    return f"while {steps[-1]}" if steps else "before it started"


def _reason(returncode: int, out: str, err: str) -> str:
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    detail = " ".join(lines[-2:])[-300:] or f"exit status {returncode}"
    if returncode == -signal.SIGALRM:
        return f"the trial was stopped {_last_step(out)}: it took longer than {COMPILE_SECONDS} s"
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else -returncode
        return f"llama.cpp crashed ({name}) {_last_step(out)}: {detail}"
    return f"the trial failed {_last_step(out)}: {detail}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
