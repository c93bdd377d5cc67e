"""Several processes sharing one models directory (issue 13): what one adds, replaces or deletes,
the others see at their next listing; models_list.json stays whole and true; same-name uploads
race to exactly one winner.

Two ModelManagers on one directory behave as two processes do (each opens its own lock
descriptors, so their flocks conflict); the races, a half-written upload and a killed lock
holder use real child processes. Models are small real GGUF files (tests/gguf_edit.py's
tiny_llama) tried by the real trial, and the real default model where an app serves one.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import MODEL_NAME, ROOT, TEST_N_CTX, small_tmpfs, wait_until
from gguf_edit import tiny_llama
from models.model_manager import ModelManager
from models.probe import SubprocessTrial
from models.registry_file import REGISTRY_FILE, REGISTRY_LOCK, TRIALS_LOCK
from models.uploads import disk_full
from services.errors import InsufficientStorage, ModelNotFound


class CountingTrial:
    """The real trial, counted: a process that takes another's result over must not run it."""

    def __init__(self):
        self.real = SubprocessTrial(120, TEST_N_CTX, 512)
        self.tried: list[Path] = []

    def __call__(self, path: Path) -> None:
        self.tried.append(path)
        self.real(path)

    def cancel(self):
        self.real.cancel()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[Path]:
    """Three small, distinct, loadable GGUF models."""
    folder = tmp_path_factory.mktemp("tiny")
    return [tiny_llama(folder / f"tiny{i}.gguf", byte_tokens=True, n_vocab=300 + 10 * i)
            for i in range(3)]


@pytest.fixture
def shared(tmp_path):
    """A models directory and a factory of managers on it (each one "a process"), closed after."""
    directory = tmp_path / "shared"
    directory.mkdir()
    managers = []

    def start(probe=None, **options) -> ModelManager:
        manager = ModelManager(str(directory), probe=probe or CountingTrial(), background=False,
                               **options)
        manager.changes = []
        manager.on_change = lambda name, kind: manager.changes.append((name, kind))
        managers.append(manager)
        return manager

    start.directory = directory
    yield start
    for manager in managers:
        manager.close()


def upload(manager: ModelManager, source: Path, name: str, overwrite: bool = False):
    incoming = manager.new_upload()
    try:
        incoming.write(source.read_bytes())
        return manager.add(incoming, name, overwrite)
    finally:
        incoming.discard()


def registry(directory: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((directory / REGISTRY_FILE).read_text())["models"]}


def assert_consistent(directory: Path) -> None:
    """models_list.json parses, has one entry per model file, each describing the file on disk;
    no temp file is left."""
    entries = registry(directory)
    files = {p.name for p in directory.glob("*.gguf")}
    assert set(entries) == files
    for name, entry in entries.items():
        stat = (directory / name).stat()
        assert (entry["size_bytes"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
    leftovers = [p.name for p in directory.iterdir() if p.name.endswith((".tmp", ".partial"))]
    assert leftovers == []


def child(code: str, *args: str) -> subprocess.Popen:
    """A separate Python process running `code` against this checkout."""
    prelude = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


# -- one process's change, seen by another --------------------------------------------------

def test_an_upload_through_one_process_is_ready_in_the_others_next_listing_untried(shared, tiny):
    first, second = shared(), shared()
    added = upload(first, tiny[0], "fresh")
    assert added.status == "ready" and len(first._probe.tried) == 1
    [seen] = second.list()
    assert (seen.name, seen.status, seen.sha256) == ("fresh.gguf", "ready", added.sha256)
    assert second.resolve("fresh").path == str(shared.directory / "fresh.gguf")
    second.run_pending_trials()
    assert second._probe.tried == []                   # taken over, neither hashed nor tried
    assert first.changes == second.changes == []       # an addition evicts nothing


def test_a_delete_and_an_overwrite_reach_the_other_process_once(shared, tiny):
    first, second = shared(), shared()
    upload(first, tiny[0], "a")
    upload(first, tiny[1], "b")
    assert {m.name for m in second.list()} == {"a.gguf", "b.gguf"}
    replaced = upload(first, tiny[2], "a", overwrite=True)
    first.remove("b")
    listed = {m.name: m for m in second.list()}
    assert set(listed) == {"a.gguf"}
    assert (listed["a.gguf"].sha256, listed["a.gguf"].status) == (replaced.sha256, "ready")
    assert sorted(second.changes) == [("a.gguf", "replaced"), ("b.gguf", "deleted")]
    second.list()
    first.list()
    assert len(second.changes) == 2 and first.changes == []   # never twice, never to the doer
    assert second._probe.tried == []
    assert_consistent(shared.directory)


def test_a_delete_another_process_made_first_is_404_and_reported(shared, tiny):
    first, second = shared(), shared()
    upload(first, tiny[0], "gone")
    second.list()
    first.remove("gone")
    with pytest.raises(ModelNotFound):
        second.remove("gone")
    assert second.changes == [("gone.gguf", "deleted")]


def test_an_idle_watching_process_hears_of_a_delete_without_a_request(shared, tiny):
    first, second = shared(), shared()
    upload(first, tiny[0], "watched")
    second.list()
    heard = []
    second.watch(lambda name, kind: heard.append((name, kind)), every=0.05)
    first.remove("watched")
    assert wait_until(lambda: heard == [("watched.gguf", "deleted")], 10)


def test_a_file_copied_in_by_hand_is_tried_once_for_all_processes(shared, tiny):
    first, second = shared(), shared()
    os.link(tiny[0], shared.directory / "by-hand.gguf")
    assert [m.status for m in first.list()] == [m.status for m in second.list()] == ["trial"]
    first.run_pending_trials()
    second.run_pending_trials()
    assert [m.status for m in second.list()] == ["ready"]
    assert len(first._probe.tried) + len(second._probe.tried) == 1
    assert_consistent(shared.directory)


# -- models_list.json: merged, never lost, never trusted blindly ----------------------------

def test_writes_of_two_processes_merge_instead_of_overwriting_each_other(shared, tiny):
    first, second = shared(), shared()
    upload(first, tiny[0], "one")
    upload(second, tiny[1], "two")       # second never listed "one" before writing
    assert set(registry(shared.directory)) == {"one.gguf", "two.gguf"}
    assert registry(shared.directory)["one.gguf"]["status"] == "ready"
    assert_consistent(shared.directory)


def test_a_ready_entry_for_another_mtime_is_not_adopted(shared, tiny):
    first = shared()
    upload(first, tiny[0], "real")
    os.link(tiny[1], shared.directory / "forged.gguf")
    entries = registry(shared.directory)
    stat = (shared.directory / "forged.gguf").stat()
    forged = dict(entries["real.gguf"], name="forged.gguf", size_bytes=stat.st_size,
                  mtime_ns=stat.st_mtime_ns + 1)
    escaping = dict(entries["real.gguf"], name="../escape.gguf")
    (shared.directory / REGISTRY_FILE).write_text(json.dumps(
        {"models": [entries["real.gguf"], forged, escaping]}))
    second = shared()
    listed = {m.name: m for m in second.list()}
    assert set(listed) == {"real.gguf", "forged.gguf"}
    assert (listed["forged.gguf"].status, listed["forged.gguf"].sha256) == ("trial", None)
    assert listed["real.gguf"].path == str(shared.directory / "real.gguf")
    assert "../escape.gguf" not in registry(shared.directory)


def test_lock_files_are_never_models_and_a_planted_symlink_is_not_followed(shared, tiny, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, shared.directory / REGISTRY_LOCK)
    first = shared()
    upload(first, tiny[0], "m")
    first.run_pending_trials()
    os.link(tiny[1], shared.directory / "hand.gguf")      # its trial takes the trials lock
    first.run_pending_trials()
    assert victim.read_text() == "precious"
    assert not (shared.directory / REGISTRY_LOCK).is_symlink()
    assert all((shared.directory / lock).is_file() for lock in (REGISTRY_LOCK, TRIALS_LOCK))
    assert [m.name for m in first.list()] == ["hand.gguf", "m.gguf"]
    second = shared()                                     # a starting process keeps the locks
    assert (shared.directory / TRIALS_LOCK).exists() and len(second.list()) == 2


def test_a_full_disk_during_the_merge_write_keeps_memory_and_disk_as_before(
        shared, tiny, monkeypatch):
    first, second = shared(), shared()
    upload(first, tiny[0], "kept")
    before = (shared.directory / REGISTRY_FILE).read_text()

    def full(directory, text):
        raise disk_full(OSError(28, "No space left on device"), REGISTRY_FILE)

    monkeypatch.setattr("models.model_directory.write_atomically", full)
    with pytest.raises(InsufficientStorage):
        upload(second, tiny[1], "doomed")
    with pytest.raises(InsufficientStorage):
        second.copy("kept", "doomed-copy")
    monkeypatch.undo()
    assert (shared.directory / REGISTRY_FILE).read_text() == before
    assert {m.name for m in second.list()} == {m.name for m in first.list()} == {"kept.gguf"}
    assert_consistent(shared.directory)


def test_a_really_full_disk_during_the_merge_write_leaves_nothing_half_written(tmp_path, tiny):
    managers = []
    with small_tmpfs(tmp_path / "disk") as disk:
        try:
            first = ModelManager(str(disk), probe=CountingTrial(), background=False)
            second = ModelManager(str(disk), probe=CountingTrial(), background=False)
            managers += [first, second]
            upload(first, tiny[0], "kept")
            second.list()
            before = (disk / REGISTRY_FILE).read_text()
            with open(disk / "filler.bin", "wb", buffering=0) as filler:
                with pytest.raises(OSError):
                    while True:
                        filler.write(b"\0" * 4096)
            with pytest.raises(InsufficientStorage):
                second.copy("kept", "linked")        # a hard link needs no space; the registry does
            assert (disk / REGISTRY_FILE).read_text() == before
            assert sorted(p.name for p in disk.glob("*.gguf")) == ["kept.gguf"]
            assert [m.name for m in second.list()] == ["kept.gguf"]
            (disk / "filler.bin").unlink()
            assert_consistent(disk)
        finally:
            for manager in managers:
                manager.close()


# -- real processes -------------------------------------------------------------------------

RACE = """
    import json, sys
    from pathlib import Path
    from models.model_manager import ModelManager
    from services.errors import ModelConflict
    directory, source, name = sys.argv[1:4]
    manager = ModelManager(directory, probe=lambda path: None, background=False)
    incoming = manager.new_upload()
    incoming.write(Path(source).read_bytes())
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        model = manager.add(incoming, name, overwrite=False)
        print(json.dumps({"won": True, "sha256": model.sha256}), flush=True)
    except ModelConflict as exc:
        print(json.dumps({"won": False, "error": exc.message}), flush=True)
    finally:
        incoming.discard()
        manager.close()
"""


def test_two_processes_uploading_one_name_at_once_exactly_one_wins(shared, tiny):
    for round_ in range(4):
        name = f"contested-{round_}"
        racers = [child(RACE, str(shared.directory), str(tiny[i]), name) for i in (0, 1)]
        try:
            assert [r.stdout.readline().strip() for r in racers] == ["ready", "ready"]
            for racer in racers:                   # both are past their trial: go together
                racer.stdin.write("go\n")
                racer.stdin.flush()
            outcomes = [json.loads(r.stdout.readline()) for r in racers]
        finally:
            for racer in racers:
                racer.stdin.close()
                racer.wait(timeout=60)
                racer.stdout.close()
        assert sorted(o["won"] for o in outcomes) == [False, True], outcomes
        winner = next(o for o in outcomes if o["won"])
        loser = next(o for o in outcomes if not o["won"])
        assert "exists" in loser["error"]
        entry = registry(shared.directory)[f"{name}.gguf"]
        assert entry["sha256"] == winner["sha256"]
        on_disk = (shared.directory / f"{name}.gguf").read_bytes()
        assert on_disk == tiny[[0, 1][outcomes.index(winner)]].read_bytes()
    assert_consistent(shared.directory)


WRITER = """
    import random, sys
    from pathlib import Path
    from models.model_manager import ModelManager
    from services.errors import ModelConflict, ModelNotFound
    directory, me, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sources = [Path(p).read_bytes() for p in sys.argv[4:]]
    manager = ModelManager(directory, probe=lambda path: None, background=False)
    rng = random.Random(me)
    for _ in range(rounds):
        name = rng.choice(["shared", "shared", f"own-{me}"])
        op = rng.choice(["add", "overwrite", "remove", "list"])
        try:
            if op == "list":
                manager.list()
            elif op == "remove":
                manager.remove(name)
            else:
                incoming = manager.new_upload()
                try:
                    incoming.write(rng.choice(sources))
                    manager.add(incoming, name, overwrite=op == "overwrite")
                finally:
                    incoming.discard()
        except (ModelConflict, ModelNotFound):
            pass
    manager.close()
    print("done", flush=True)
"""


def test_interleaved_writers_leave_a_whole_and_true_registry(shared, tiny):
    directory = shared.directory
    stop, seen = threading.Event(), []

    def read_registry_meanwhile():
        while not stop.is_set():
            try:
                seen.append(len(registry(directory)))
            except FileNotFoundError:
                pass

    reader = threading.Thread(target=read_registry_meanwhile)
    reader.start()
    writers = [child(WRITER, str(directory), str(i), "30", *map(str, tiny)) for i in range(4)]
    try:
        for writer in writers:
            assert writer.stdout.readline().strip() == "done"
    finally:
        stop.set()
        reader.join()
        for writer in writers:
            writer.stdin.close()
            writer.wait(timeout=60)
            writer.stdout.close()
    assert seen, "the reader never saw models_list.json"       # and never a torn one
    assert_consistent(directory)
    listed = {m.name: m for m in shared().list()}
    assert set(listed) == set(registry(directory))
    assert all(m.status == "ready" for m in listed.values())


HALF_UPLOAD = """
    import sys
    from pathlib import Path
    from models.model_manager import ModelManager
    manager = ModelManager(sys.argv[1], probe=lambda path: None, background=False)
    incoming = manager.new_upload()
    incoming.write(Path(sys.argv[2]).read_bytes()[:50000])
    print(incoming.path, flush=True)
    sys.stdin.readline()
    manager.close()
"""


def test_another_live_processs_half_written_upload_is_neither_listed_nor_removed(shared, tiny):
    uploader = child(HALF_UPLOAD, str(shared.directory), str(tiny[0]))
    try:
        partial = Path(uploader.stdout.readline().strip())
        assert partial.parent == shared.directory and partial.stat().st_size == 50000
        starting = shared()
        assert starting.list() == [] and partial.exists()
        with pytest.raises(ModelNotFound):
            starting.find(partial.name)
    finally:
        uploader.stdin.close()
        uploader.wait(timeout=60)
        uploader.stdout.close()
    assert not partial.exists()                 # its own process discarded it on close


HOLD_REGISTRY_LOCK = """
    import sys, time
    from pathlib import Path
    from models.registry_file import REGISTRY_LOCK, LockFile
    with LockFile(Path(sys.argv[1]) / REGISTRY_LOCK).held():
        print("locked", flush=True)
        time.sleep(600)
"""


def test_a_process_killed_holding_the_registry_lock_blocks_no_one(shared, tiny):
    manager = shared()
    holder = child(HOLD_REGISTRY_LOCK, str(shared.directory))
    try:
        assert holder.stdout.readline().strip() == "locked"
        fd = os.open(shared.directory / REGISTRY_LOCK, os.O_RDWR)
        with pytest.raises(BlockingIOError):           # really held by the child
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        done = []
        adding = threading.Thread(target=lambda: done.append(upload(manager, tiny[0], "after")))
        adding.start()
        time.sleep(0.5)
        assert adding.is_alive() and done == []        # waits for the holder ...
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        adding.join(timeout=60)                         # ... and goes on once it died
        assert not adding.is_alive() and done[0].status == "ready"
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)
        holder.stdin.close()
        holder.stdout.close()
    assert_consistent(shared.directory)


# -- two apps: the pool follows another process's delete ------------------------------------

def test_a_model_deleted_through_one_app_is_unloaded_in_the_other(make_app, tmp_path, model_file,
                                                                  model_registry):
    directory = tmp_path / "store"
    directory.mkdir()
    os.symlink(model_file, directory / MODEL_NAME)
    (directory / REGISTRY_FILE).write_text(model_registry)
    serving, deleting = (make_app(MODELS_DIR=str(directory)) for _ in range(2))
    serving.extensions["llm"].model_admin.copy(MODEL_NAME, "doomed")
    generated = serving.test_client().post("/api/v1/generate", json={
        "model": "doomed.gguf", "prompt": "Hello", "max_tokens": 4})
    assert generated.status_code == 200, generated.json
    backend = serving.extensions["llm"]
    assert "doomed.gguf" in {m.name for m in backend.pool.loaded_models() if m.instances}
    gone = deleting.test_client().delete("/api/v1/models/doomed.gguf")
    assert gone.status_code == 200, gone.json
    # No request reaches the serving app: its watch notices within a few seconds.
    assert wait_until(lambda: "doomed.gguf" not in {
        m.name for m in backend.pool.loaded_models() if m.instances}, 20)
    kinds = [e.kind for e in backend.model_events.recent() if e.model == "doomed.gguf"]
    assert "deleted" in kinds
    listed = serving.test_client().get("/api/v1/models").json["models"]
    assert [m["name"] for m in listed] == [MODEL_NAME]
