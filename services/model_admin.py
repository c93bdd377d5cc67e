"""Adding, removing and describing models across the model directories, with the pool in step.

Each model type ("gguf", "deepseek") has its own directory and ModelManager; this is the one
place that knows all of them, so an upload, a delete or a listing means the same thing for both.
Uploads, imports and copies are published as `uploaded` model events, deletes as `deleted`;
so are the deletes and replacements other processes sharing a directory make, when a manager
notices them (its next listing, or its watch every few seconds).
"""

from __future__ import annotations

import functools

from models.gguf_header import read_gguf
from models.model_file import ModelFile
from models.model_manager import ModelManager
from models.uploads import HashingFile, expected_sha256, model_file_name, sanitised_file_name
from services.errors import InvalidRequest, ModelNotFound
from services.engine.memory import MemoryGuard, estimate_load, system_report
from services.model_events import ModelEvents
from services.model_pool import ModelPool, model_of


class ModelAdmin:
    def __init__(self, managers: dict[str, ModelManager], pool: ModelPool, guard: MemoryGuard,
                 kv_cells: int, events: ModelEvents | None = None):
        self.managers = managers
        self.pool = pool
        self.guard = guard
        self.kv_cells = kv_cells
        self.events = events or pool.events
        for model_type, manager in managers.items():
            manager.watch(functools.partial(self._changed_elsewhere, model_type))

    def _changed_elsewhere(self, model_type: str, name: str, kind: str) -> None:
        """Another process deleted or replaced a model: this process's instances of it go like
        after its own delete or upload (running generations finish on the old file first)."""
        self.pool.evict(name, reason=kind)
        self.events.publish("deleted" if kind == "deleted" else "uploaded", name,
                            type=model_type, source=None if kind == "deleted" else "elsewhere")

    def manager(self, model_type: str | None) -> ModelManager:
        """:raise InvalidRequest: not a known model type."""
        manager = self.managers.get(model_type or "gguf")
        if manager is None:
            raise InvalidRequest(f"type must be one of {', '.join(self.managers)}, got {model_type!r}")
        return manager

    def new_upload(self, model_type: str | None) -> HashingFile:
        """A temp file for an incoming model, in its type's directory when the type is known."""
        return self.manager(model_type if model_type in self.managers else None).new_upload()

    def add(self, incoming: HashingFile, model_type: str | None, name: str | None,
            filename: str | None, overwrite: bool, sha256: str | None = None,
            source: str = "upload") -> dict:
        """Register a received file once it passed its trial; a replaced model's instances are
        evicted. `sha256`, when given, must match the bytes received.

        :raise InvalidRequest, ChecksumMismatch, InvalidModelFile, UnloadableModel,
            ModelConflict, InsufficientStorage:
        """
        manager = self.manager(model_type)
        file_name = model_file_name(name) if name else sanitised_file_name(filename or "")
        model = manager.add(incoming, file_name, overwrite, source, expected_sha256(sha256))
        self.pool.evict(model.name, reason="replaced")
        self.events.publish("uploaded", model.name, type=model.type, source=source,
                            sha256=model.sha256)
        return self._describe(model)

    def copy(self, source: str, destination: str, model_type: str | None = None) -> dict:
        """A copy of a model under a new name in the same directory, served at once (same bytes,
        same trial result; see ModelManager.copy). An existing destination is never replaced.

        :raise ModelNotFound, ModelOnTrial, ModelUnusable, ModelConflict, InsufficientStorage:
        :raise InvalidRequest: (param "destination") not a valid model name.
        """
        manager = self._manager_holding(source, model_type)
        if len(destination) > 256:          # not echoed back: it could be megabytes
            raise InvalidRequest("invalid model name: at most 128 characters",
                                 param="destination")
        try:
            model_file_name(destination)
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, param="destination") from None
        model = manager.copy(source, destination)
        self.events.publish("uploaded", model.name, type=model.type, source="copy",
                            copied_from=source, sha256=model.sha256)
        return self._describe(model)

    def remove(self, name: str, model_type: str | None = None) -> dict:
        """Delete a model; running generations finish on the old file, then its instances go.

        :raise ModelNotFound:
        """
        manager = self._manager_holding(name, model_type)
        model = manager.remove(name)
        closed = self.pool.evict(model.name, reason="deleted")
        self.events.publish("deleted", model.name, type=model.type)
        return {"removed": model.to_dict(), "instances_closed": closed}

    def list(self, model_type: str | None = None) -> list[dict]:
        managers = [self.manager(model_type)] if model_type else list(self.managers.values())
        return [self._describe(model) for manager in managers for model in manager.list()]

    def describe(self, name: str, model_type: str | None = None) -> dict:
        """:raise ModelNotFound:"""
        return self._describe(self._manager_holding(name, model_type).find(name))

    def metadata(self, name: str, model_type: str | None = None) -> dict:
        """A model's GGUF metadata: its scalars and strings (arrays such as the vocabulary are
        left out), read from the file's header.

        :raise ModelNotFound:
        """
        model = self._manager_holding(name, model_type).find(name)
        return {key: value for key, value in read_gguf(model.path).metadata.items()
                if value is not None}

    def system(self) -> dict:
        """Memory, cores, disk per directory, and whether each model fits in memory now."""
        loaded = {name for name, (instances, _) in self._pool_state().items() if instances}
        models = [(m.name, m.type, self.cost(m), m.name in loaded)
                  for manager in self.managers.values() for m in manager.list()]
        return system_report(self.guard, {kind: str(m.models_dir) for kind, m in self.managers.items()},
                             models)

    def cost(self, model: ModelFile):
        """The weights, and the KV cache of the model's batched context: every slot's cells."""
        return estimate_load(model.size_bytes, model.kv_bytes_per_token, self.kv_cells)

    def _manager_holding(self, name: str, model_type: str | None) -> ModelManager:
        managers = [self.manager(model_type)] if model_type else list(self.managers.values())
        for manager in managers:
            try:
                manager.find(name)
                return manager
            except ModelNotFound:
                continue
        raise ModelNotFound(f"model {name!r} not found; GET /api/v1/models lists the models")

    def _pool_state(self) -> dict[str, tuple[int, int]]:
        """(instances, in use) per model file, over all its pool entries (contexts, variants)."""
        state: dict[str, tuple[int, int]] = {}
        for entry in self.pool.loaded_models():
            instances, in_use = state.get(model_of(entry.name), (0, 0))
            state[model_of(entry.name)] = (instances + entry.instances, in_use + entry.in_use)
        return state

    def _describe(self, model: ModelFile) -> dict:
        instances, in_use = self._pool_state().get(model.name, (0, 0))
        info = model.to_dict()
        info.update(loaded=instances > 0, instances=instances, in_use=in_use,
                    memory_estimate_bytes=self.cost(model).first_instance)
        return info
