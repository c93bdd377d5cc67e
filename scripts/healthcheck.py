"""Probe this container's server: `python scripts/healthcheck.py /health` exits 0 on a 200.

The image's HEALTHCHECK, the compose healthchecks and the Kubernetes readiness probe run it
inside the container: the slim image has no curl, and a readiness check of /api/v1/health needs
what an HTTP probe cannot carry — a Host the server answers to (ALLOWED_HOSTS; `localhost` is
in every deployment file's list) and, when keys exist, a key: the first of API_KEYS (then
ADMIN_KEYS) from the same settings the server read. Keys made with `flask keys create` live in
the key store, not in the settings, so a deployment that uses keys sets one in API_KEYS for its
probes and Prometheus (compose.yaml and deploy/k8s do).
"""

import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import load_config  # noqa: E402
from services.errors import ConfigError  # noqa: E402

PROBE_HOST = "localhost"


def probe(path: str, timeout: float) -> int:
    """0 when GET `path` on this machine's server answers 200, else 1 (2: bad settings)."""
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    headers = {"Host": PROBE_HOST}
    keys = (*config.API_KEYS, *config.ADMIN_KEYS)
    if keys:
        headers["Authorization"] = f"Bearer {keys[0]}"
    url = f"http://127.0.0.1:{config.PORT}{path}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=timeout) as reply:
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1] if len(sys.argv) > 1 else "/health", timeout=5.0))
