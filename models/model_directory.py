"""One models directory kept in step with the disk and with the other processes sharing it.

The directory is the truth; models_list.json remembers what is costly to recompute (sha256, the
result of each file's trial, when and how a model arrived). Every listing reconciles the two:
files copied in by hand appear, files removed by hand disappear, and a missing or corrupt
models_list.json is rebuilt.

Files that appear on disk (copied by hand, or from a version without trials) are listed with
status "trial" and tried in the background, one at a time. The result is remembered with the
file's identity (size and mtime_ns; sha256 once known), so a restart does not try a file again
and a changed file is tried anew.

Several processes may share the directory (models/shared_registry.py): each merges its changes
into models_list.json under a lock file, takes over what the others found (a file another process
uploaded is served at once, not tried again), and hears of models another process deleted or
replaced at its next listing (`on_change`; `watch` also lists it every WATCH_SECONDS).
models/model_manager.py builds on this: finding, adding, copying and removing models.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from models.gguf_header import GGUFError
from models.model_file import READY, TRIAL, UNUSABLE, ModelFile, describe_gguf, from_entry
from models.probe import TRIAL_VERSION, SubprocessTrial
from models.registry_file import (REGISTRY_FILE, REGISTRY_LOCK, TRIALS_LOCK, LockFile,
                                  read_registry, sha256_of_file, write_atomically)
from models.shared_registry import (Every, adopted, describes, entries_of, known_sha256, merged,
                                    registry_stamp, scan_models, settled)
from models.uploads import TEMP_PREFIX, TEMP_SUFFIX, remove_stale_temp_files
from services.errors import (InsufficientStorage, ModelLoadError, ShuttingDown,
                             UnloadableModel)

log = logging.getLogger(__name__)

# Temp files of killed processes, removed at start unless a live process holds their lock.
STALE_PATTERNS = (f"{TEMP_PREFIX}*{TEMP_SUFFIX}", f".{REGISTRY_FILE}.*.tmp", ".install-*.partial")
# How often a watching directory is listed on its own, so that an idle process frees the
# instances of a model another process deleted (its file's space is only reclaimed then).
WATCH_SECONDS = 2.0
Probe = Callable[[Path], None]
OnChange = Callable[[str, str], None]


class ModelDirectory:
    """The models of one directory as this process knows them; thread-safe. `probe` tries files
    before they may be served.

    With `background=False` files found on disk wait for `run_pending_trials` (the setup
    script and the test fixtures) instead of being tried on a worker thread. `siblings` is a
    list shared by the directories of one app: a file found on disk that is the very file
    another entry describes (a link: same device, inode, size and mtime) takes over its trial
    result.
    """

    def __init__(self, models_dir: str, model_type: str = "gguf", probe: Probe | None = None,
                 background: bool = True, siblings: list[ModelDirectory] | None = None,
                 on_change: OnChange | None = None):
        self.models_dir = Path(models_dir)
        self.model_type = model_type
        self.on_change = on_change      # (name, "deleted" | "replaced") by another process
        self._probe = probe or SubprocessTrial()
        self._background = background
        self._lock = threading.RLock()
        self._registry_lock = LockFile(self.models_dir / REGISTRY_LOCK)
        self._trials_lock = LockFile(self.models_dir / TRIALS_LOCK)
        self._models: dict[str, ModelFile] = {}
        self._installed_default: str | None = None
        self._pending: set[str] = set()
        self._closed = False
        # Changes models_list.json has not received yet (a write failed, or none was due), and
        # the names being renamed into place by the write in progress.
        self._unsaved: dict[str, ModelFile | None] = {}
        self._publishing: set[str] = set()
        self._seen_stamp: tuple | None = None       # models_list.json as last read
        self._ignored: dict[str, tuple[int, int]] = {}   # unacceptable files, by identity
        self._watcher: Every | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-trial")
        self._siblings = siblings if siblings is not None else []
        self._siblings.append(self)
        if self.models_dir.is_dir():
            remove_stale_temp_files(self.models_dir, STALE_PATTERNS)
        self._load_registry()
        self.sync()

    def _became_ready(self) -> None:
        """A model just became servable (its trial passed, or it was added)."""

    # -- reconciling with the disk and with the other processes -----------------------------

    def sync(self) -> None:
        """Reconcile the registry with the directory and with what other processes sharing it
        recorded; persist what this process found; queue the files that still need a hash or a
        trial; report models another process deleted or replaced (`on_change`, no lock held).

        Cheap when nothing changed: a directory scan, a stat per model file and one of
        models_list.json. Only a new, changed or vanished file, or a rewritten models_list.json,
        costs a read of models_list.json (under the shared lock: a publish in progress is seen
        whole or not at all)."""
        with self._lock:
            files = scan_models(self.models_dir)
            if self._up_to_date(files) and not self._unsaved:
                changes = []
            else:
                with self._registry_lock.held(shared=True):
                    files = scan_models(self.models_dir)
                    self._seen_stamp = registry_stamp(self.models_dir)
                    disk = entries_of(read_registry(self.models_dir))
                changes = self._reconcile(files, disk)
                if self._unsaved:
                    self._save_registry_or_log()
            if self._background and not self._closed:
                for model in self._models.values():
                    if self._unsettled(model) and model.name not in self._pending:
                        self._pending.add(model.name)
                        self._worker.submit(self._settle_logged, model.name)
        for name, kind in changes:
            self._notify(name, kind)

    def _up_to_date(self, files: dict[str, tuple[int, int]]) -> bool:
        """Whether memory already describes every file as it is, and models_list.json is the
        one last read. Lock held."""
        if registry_stamp(self.models_dir) != self._seen_stamp:
            return False
        if set(files) != set(self._models) | set(self._ignored):
            return False
        return all((self._models[n].size_bytes, self._models[n].mtime_ns) == identity
                   if n in self._models else self._ignored[n] == identity
                   for n, identity in files.items())

    def _reconcile(self, files: dict[str, tuple[int, int]],
                   disk: dict[str, dict]) -> list[tuple[str, str]]:
        """Bring memory in line with the files and the registry on disk; the models this
        process knew that are gone or changed, for `on_change`. Lock held."""
        changes = []
        for name in set(self._models) - set(files):
            del self._models[name]
            self._unsaved[name] = None
            changes.append((name, "deleted"))
        for name in set(self._ignored) - set(files):
            del self._ignored[name]
        for name, (size, mtime_ns) in files.items():
            known = self._models.get(name)
            if known is not None and (known.size_bytes, known.mtime_ns) == (size, mtime_ns):
                if self._unsettled(known):
                    self._models[name] = adopted(known, disk.get(name), size, mtime_ns)
                continue
            if self._ignored.get(name) == (size, mtime_ns):
                continue
            model = self._found(name, disk.get(name), size, mtime_ns)
            if known is not None:
                changes.append((name, "replaced" if model is not None else "deleted"))
        return changes

    def _found(self, name: str, entry: dict | None, size: int, mtime_ns: int) -> ModelFile | None:
        """A file new to this process (or changed): the registry's entry for it when it
        describes this very file, else a fresh description (status "trial") that is recorded.
        None (and ignored until it changes) when it is no acceptable GGUF file. Lock held."""
        path = self.models_dir / name
        if describes(entry, size, mtime_ns):
            try:
                st = path.stat()
                model = replace(from_entry(self.models_dir, entry),
                                inode=f"{st.st_dev}:{st.st_ino}")
            except (TypeError, ValueError, OSError):
                model = None
            if model is not None:
                if not settled(entry):
                    model = replace(model, status=TRIAL, unusable_reason=None)
                self._models[name] = model
                return model
        try:
            model = self._as_known(describe_gguf(path, self.model_type, "disk"))
        except (GGUFError, OSError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            self._models.pop(name, None)
            self._ignored[name] = (size, mtime_ns)
            return None
        self._models[name] = model
        self._unsaved[name] = model
        return model

    def _notify(self, name: str, kind: str) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(name, kind)
        except Exception:
            log.exception("on_change(%s, %s) failed", name, kind)

    def watch(self, on_change: OnChange, every: float = WATCH_SECONDS) -> None:
        """Report models other processes delete or replace to `on_change`, also while no
        request lists them: the directory is listed every `every` seconds until `close`."""
        self.on_change = on_change
        if self._watcher is None and not self._closed:
            self._watcher = Every(every, self.sync, f"model-watch-{self.model_type}")

    def _as_known(self, model: ModelFile) -> ModelFile:
        """`model` with the hash and trial result of an entry describing the same file, if any."""
        for manager in self._siblings:
            # A snapshot, not the sibling's lock: two syncs taking each other's would deadlock.
            entries = list(manager._models.values())
            known = next((m for m in entries if (m.inode, m.size_bytes, m.mtime_ns) == (
                model.inode, model.size_bytes, model.mtime_ns)
                and m.trial_version == TRIAL_VERSION and m.status != TRIAL), None)
            if known is not None:
                return replace(model, sha256=known.sha256, status=known.status,
                               unusable_reason=known.unusable_reason, trial_version=TRIAL_VERSION)
        return model

    # -- trying files found on disk ----------------------------------------------------------

    @staticmethod
    def _unsettled(model: ModelFile) -> bool:
        return model.sha256 is None or model.status == TRIAL

    def run_pending_trials(self) -> None:
        """Hash and try, here and now, every file still waiting (setup script, fixtures)."""
        for model in self.list():
            if self._unsettled(model):
                self._settle(model.name)

    def _settle_logged(self, name: str) -> None:
        try:
            self._settle(name)
        except Exception:
            log.exception("the background trial of %s failed", name)
        finally:
            with self._lock:
                self._pending.discard(name)

    def _settle(self, name: str) -> None:
        """Hash and try a file found on disk, unless a record for the same bytes (here, or by
        another process sharing the directory) already says how it went. Under the trials lock
        file: one process at a time, so replicas that see a new file at once hash and try it
        once, and the others take the result over from models_list.json."""
        with self._lock:
            model = self._models.get(name)
        if model is None or self._closed:
            return
        path = Path(model.path)
        with self._trials_lock.held():
            model = self._adopt_from_disk(model)
            if model is not None and model.sha256 is None:
                digest = sha256_of_file(path)
                model = self._update(model, sha256=digest) if digest else None
            if model is None or model.status != TRIAL:
                return
            try:
                self._try_now(path, model.sha256)
                result = {"status": READY, "unusable_reason": None}
            except UnloadableModel as exc:
                result = {"status": UNUSABLE, "unusable_reason": exc.message}
                log.warning("%s is unusable: %s", path, exc.message)
            except ShuttingDown:
                return
            except ModelLoadError as exc:      # the trial could not run: the file is not at fault
                log.error("could not try %s: %s", path, exc.message)
                return
            self._update(model, trial_version=TRIAL_VERSION, **result)

    def _try_now(self, path: Path, sha256: str) -> None:
        """The trial, or the remembered result of a file with the same bytes.

        :raise UnloadableModel:
        """
        with self._lock:
            known = next((m for m in self._models.values() if m.sha256 == sha256
                          and m.trial_version == TRIAL_VERSION and m.status != TRIAL), None)
        if known is None:
            self._probe(path)
        elif known.status == UNUSABLE:
            raise UnloadableModel(known.unusable_reason or "its trial failed")

    def _update(self, model: ModelFile, record: bool = True, **fields) -> ModelFile | None:
        """Note a finding about `model` (and record it in models_list.json unless it was read
        from there) if its file has not changed meanwhile."""
        with self._lock:
            current = self._models.get(model.name)
            if current is None or current.mtime_ns != model.mtime_ns or not model.same_file(
                    Path(model.path)):
                return None
            updated = self._models[model.name] = replace(current, **fields)
            if record:
                self._unsaved[model.name] = updated
                self._save_registry_or_log()
            if updated.status == READY:
                self._became_ready()
            return updated

    def _adopt_from_disk(self, model: ModelFile) -> ModelFile | None:
        """Another process sharing the directory may have hashed or tried the same file."""
        entry = entries_of(read_registry(self.models_dir)).get(model.name)
        if not describes(entry, model.size_bytes, model.mtime_ns):
            return model
        if settled(entry):
            return self._update(model, record=False, sha256=entry["sha256"],
                                status=entry["status"], trial_version=TRIAL_VERSION,
                                unusable_reason=entry.get("unusable_reason"))
        if model.sha256 is None and known_sha256(entry):
            return self._update(model, record=False, sha256=entry["sha256"])
        return model

    # -- models_list.json -------------------------------------------------------------------

    def _commit(self, changes: dict[str, ModelFile | None], then: Callable[[], None]) -> None:
        """Apply registry changes, merge them into models_list.json, then run `then` (the rename
        or link that publishes the files); on failure memory is restored and, if the write had
        been done, undone on disk as far as the files allow. Both locks held."""
        before = {name: self._models.get(name) for name in changes}
        for name, model in changes.items():
            self._set(name, model)
            self._unsaved[name] = model
        written = False
        try:
            self._publishing = set(changes)
            try:
                self._save_registry()
            finally:
                self._publishing = set()
            written = True
            then()
        except BaseException:
            for name, model in before.items():
                self._set(name, model)
                self._unsaved[name] = model
            if written:
                self._save_registry_or_log()
            else:
                for name in before:
                    self._unsaved.pop(name, None)
            raise

    def _set(self, name: str, model: ModelFile | None) -> None:
        if model is None:
            self._models.pop(name, None)
        else:
            self._models[name] = model

    def _load_registry(self) -> None:
        """What models_list.json remembers, by the same rules as an entry adopted from another
        process (entries_of: a valid name, the file's identity); the path is derived, never read
        back, so the file cannot point elsewhere."""
        path = self.models_dir / REGISTRY_FILE
        registry = read_registry(self.models_dir)
        if not registry and path.exists():
            log.warning("%s is unreadable; rebuilding it from the files", path)
        try:
            self._models = {name: from_entry(self.models_dir, entry)
                            for name, entry in entries_of(registry).items()}
        except (TypeError, ValueError) as exc:
            log.warning("%s is unreadable (%s); rebuilding it from the files", path, exc)
            self._models = {}
        default = registry.get("default_model")
        self._installed_default = default if isinstance(default, str) else None

    def _save_registry(self) -> None:
        """Merge this process's unsaved changes into models_list.json (read-merge-write, one
        atomic rename) under the registry lock, taken here unless this thread holds it already.
        Thread lock held. :raise InsufficientStorage:"""
        if not self.models_dir.is_dir():
            self._unsaved.clear()
            return
        changes = {name: None if model is None else _entry(model)
                   for name, model in self._unsaved.items()}
        with self._registry_lock.held():
            registry = merged(self.models_dir, read_registry(self.models_dir), changes,
                              self._publishing, self._installed_default)
            write_atomically(self.models_dir, json.dumps(registry, indent=1))
        self._unsaved.clear()

    def _save_registry_or_log(self) -> None:
        """For writes that only remember (hashes, trials, deletions): the directory stays the
        truth, so a failed write costs a re-hash or a re-trial later, never consistency."""
        try:
            self._save_registry()
        except (OSError, InsufficientStorage) as exc:
            log.warning("could not write %s: %s", self.models_dir / REGISTRY_FILE, exc)

    def close(self) -> None:
        """Stop watching, trials and hashing (a running trial's child is killed; queued work
        dropped)."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.stop()
        self._worker.shutdown(wait=False, cancel_futures=True)
        cancel = getattr(self._probe, "cancel", None)
        if cancel is not None:
            cancel()


def _entry(model: ModelFile) -> dict:
    """A model as a models_list.json entry: everything but the path, which is derived."""
    return {k: v for k, v in asdict(model).items() if k != "path"}
