"""Copies of the default model with chat templates spliced in, tried once per session.

A hand-copied file is served only after its trial, so a session fixture tries the copies once
(as `model_registry` does for the default model) and each test gets a models directory holding
links to them and that registry: `live(MODELS_DIR=templated_dir(...))`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import MODEL_NAME, tried_registry
from gguf_edit import with_chat_template
from models.registry_file import REGISTRY_FILE


def tried_copies(model_file: Path, directory: Path, templates: dict[str, str]) -> str:
    """Write `<name>.gguf` copies with `templates` into `directory`, try them (and the default
    model) once, and return the registry that says they are ready."""
    os.symlink(model_file, directory / MODEL_NAME)
    for name, template in templates.items():
        with_chat_template(model_file, directory / f"{name}.gguf", template)
    registry = json.loads(tried_registry(directory))
    assert all(entry["status"] == "ready" for entry in registry["models"]), registry
    return json.dumps(registry)


def templated_dir(source: Path, registry: str, target: Path) -> str:
    """A fresh models directory for one app: links to the tried files, and their registry."""
    target.mkdir()
    for path in source.glob("*.gguf"):
        os.symlink(path.resolve(), target / path.name)
    (target / REGISTRY_FILE).write_text(registry)
    return str(target)
