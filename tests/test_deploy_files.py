"""The deployment files, checked statically (no image can be built here): hadolint on the
Dockerfile, the Kubernetes manifests against the API's schemas (bundled, no network), and
every file cross-checked against what the server declares — its settings, its routes, its
drain time, its memory estimate — so a renamed setting or route fails here, not in a cluster.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, build_test_app
from config import SETTINGS, load_config
from scripts.healthcheck import PROBE_HOST

K8S_VERSION = "1.37.0"
K8S_DIR = ROOT / "deploy" / "k8s"
SETTING_NAMES = {setting.name for setting in SETTINGS}
# Sample values for what the operator supplies (.env for compose, the Secret for Kubernetes).
OPERATOR_ENV = {"SECRET_KEY": "s" * 64, "METRICS_KEY": "m" * 48}
# The process beyond the model's estimate: measured 628 MiB RSS after the default model's first
# generation against its 457 MiB estimate (the app itself, llama.cpp's compute buffers).
PROCESS_OVERHEAD_BYTES = 256 * 1024**2
# Variables the image sets for Python itself, not for the server.
PYTHON_ENV = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}


# ---------------------------------------------------------------- readers

def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against `env`."""
    def replace(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        value = env.get(name, "")
        if op == ":?" and not value:
            raise AssertionError(f"compose needs {name}: {arg}")
        return value or (arg if op == ":-" else "")
    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", replace, text)


def compose(env: dict[str, str] | None = None) -> dict:
    text = (ROOT / "compose.yaml").read_text()
    return yaml.safe_load(interpolate(text, OPERATOR_ENV if env is None else env))


def replicas(services: dict) -> dict[str, dict]:
    return {name: spec for name, spec in services.items() if name.startswith("replica-")}


def manifests() -> list[tuple[Path, dict]]:
    files = sorted(K8S_DIR.rglob("*.yaml"))
    assert files, "no manifests in deploy/k8s"
    return [(path, doc) for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest(kind: str) -> dict:
    found = [doc for path, doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server_container() -> dict:
    (container,) = [c for c in manifest("Deployment")["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "server"]
    return container


def k8s_environment(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env in order
    with $(VAR) expanded; downward-API fields get sample values."""
    config_map, secret = manifest("ConfigMap")["data"], manifest("Secret")["stringData"]
    sources = {"configMapRef": config_map, "secretRef": secret}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for kind, values in sources.items():
            if kind in source:
                env.update({k: str(v) for k, v in values.items()})
    fields = {"metadata.name": "llm-server-7d9c-abcde", "status.podIP": "10.1.2.3"}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)),
                                      var["value"])
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), args.strip()))
    return stages


def instructions(stage, name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


def duration_seconds(text: str) -> float:
    """Compose's durations: 90s, 1m30s, 2m."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", str(text).strip())
    assert parts and any(parts.groups()), f"not a duration: {text!r}"
    hours, minutes, seconds = (int(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def quantity_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6,
             "G": 10**9, "": 1}
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", text).groups()
    return int(number) * units[unit or ""]


def drain_seconds(env: dict[str, str]) -> float:
    """gunicorn.conf.py's graceful_timeout for these settings: SHUTDOWN_TIMEOUT + 10."""
    return load_config({**env, "APP_ENV": "testing"}).SHUTDOWN_TIMEOUT + 10


def probe_paths(command: list[str]) -> list[str]:
    """The path scripts/healthcheck.py is asked to probe by a command."""
    assert command[:2] == ["python", "scripts/healthcheck.py"], command
    return command[2:] or ["/health"]


# ---------------------------------------------------------------- Dockerfile

def test_hadolint_passes_the_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_stage_runs_gunicorn_as_a_user_with_a_health_check():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: compilers stay in the builder"
    runtime = stages[-1]
    assert "pip wheel" in " ".join(instructions(stages[0], "RUN"))
    (user,) = instructions(runtime, "USER")
    assert user.split(":")[0] not in ("root", "0"), user
    (command,) = instructions(runtime, "CMD")
    assert json.loads(command) == ["gunicorn", "-c", "gunicorn.conf.py",
                                   "app_factory:create_app()"]
    assert not instructions(runtime, "ENTRYPOINT")
    (healthcheck,) = instructions(runtime, "HEALTHCHECK")
    check = json.loads(healthcheck.split("CMD", 1)[1])
    assert probe_paths(check) == ["/health"]
    assert "build-essential" not in " ".join(instructions(runtime, "RUN"))
    copied = " ".join(instructions(runtime, "COPY") + instructions(runtime, "ADD"))
    assert ".gguf" not in copied and "models/" not in copied, copied


def test_image_settings_are_declared_and_state_is_in_volumes():
    runtime = dockerfile_stages()[-1]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions(runtime, "ENV"))))
    assert set(env) - PYTHON_ENV <= SETTING_NAMES, set(env) - PYTHON_ENV - SETTING_NAMES
    assert env["APP_ENV"] == "production" and "SECRET_KEY" not in env
    volumes = set(json.loads(" ".join(instructions(runtime, "VOLUME"))))
    for name in ("MODELS_DIR", "DEEPSEEK_MODELS_DIR", "LOG_DIR", "DATA_DIR"):
        assert env[name] in volumes, name
        # /app/models is the Python package `models`: a volume there would hide it.
        assert not env[name].startswith("/app"), env[name]
    assert instructions(runtime, "EXPOSE") == [env["PORT"]]


def test_dockerignore_keeps_local_state_out_of_the_image():
    entries = set((ROOT / ".dockerignore").read_text().split())
    for needed in (".venv", "*.gguf", "**/*.gguf", "logs", "data", ".env", ".git"):
        assert needed in entries, needed


# ---------------------------------------------------------------- compose

def test_compose_requires_the_operator_secrets():
    with pytest.raises(AssertionError, match="SECRET_KEY"):
        compose({"METRICS_KEY": "m" * 48})


def test_compose_environments_are_valid_server_settings():
    services = compose()["services"]
    configured = {name: spec for name, spec in services.items() if "environment" in spec}
    assert set(replicas(services)) < set(configured)
    for name, spec in configured.items():
        env = {k: str(v) for k, v in spec["environment"].items()}
        assert set(env) <= SETTING_NAMES, (name, set(env) - SETTING_NAMES)
        config = load_config(env)  # production: refuses a missing SECRET_KEY
        assert config.APP_ENV == "production"
        if name in replicas(services):
            assert (config.REPLICA_NAME, config.TRUSTED_PROXY_HOPS) == (name, 1)
            assert PROBE_HOST in config.ALLOWED_HOSTS and "localhost" in config.ALLOWED_HOSTS


def test_compose_replicas_match_nginx_and_prometheus():
    services = compose()["services"]
    replicas_conf = (ROOT / "deploy" / "nginx" / "replicas.conf").read_text()
    upstreams = set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", replicas_conf, re.M))
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    served = {f"{name}:{spec['environment']['PORT']}" for name, spec in replicas(services).items()}
    assert len(served) == 3
    assert upstreams == served == targets
    for name, spec in replicas(services).items():
        allowed = load_config({k: str(v) for k, v in spec["environment"].items()}).ALLOWED_HOSTS
        assert name in allowed, "Prometheus scrapes it by this name"
        assert str(spec["environment"]["PORT"]) in spec["expose"]
    assert job["metrics_path"] == "/metrics"
    key_file = job["authorization"]["credentials_file"]
    (secret,) = services["prometheus"]["secrets"]
    assert key_file == f"/run/secrets/{secret['target']}"
    assert compose()["secrets"][secret["source"]]["environment"] == "METRICS_KEY"
    assert services["replica-1"]["environment"]["API_KEYS"] == OPERATOR_ENV["METRICS_KEY"]


def test_compose_nginx_gets_the_deploy_files():
    nginx = compose()["services"]["nginx"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":") for volume in nginx["volumes"])
    for name in ("nginx.conf", "replicas.conf", "limits.conf", "upload.conf", "listen.conf"):
        assert mounts[f"./deploy/nginx/{name}"] == f"/etc/nginx/{name}"
        assert (ROOT / "deploy" / "nginx" / name).is_file(), name
    listen = re.search(r"listen\s+(\d+)\s*;", (ROOT / "deploy/nginx/listen.conf").read_text())
    assert f"{listen.group(1)}:{listen.group(1)}" in nginx["ports"]
    assert set(nginx["depends_on"]) == set(replicas(compose()["services"]))
    assert ":" in nginx["image"] and not nginx["image"].endswith(":latest")
    assert ":" in compose()["services"]["prometheus"]["image"]


def test_compose_waits_for_the_model_and_healthy_replicas_and_drains():
    services = compose()["services"]
    assert services["model-init"]["command"] == ["python", "scripts/install_model.py"]
    models_volume = next(v for v in services["model-init"]["volumes"]
                         if v.endswith(":/data/models"))
    for name, spec in replicas(services).items():
        assert spec["depends_on"]["model-init"]["condition"] == "service_completed_successfully"
        assert services["nginx"]["depends_on"][name]["condition"] == "service_healthy"
        assert models_volume in spec["volumes"], "one shared model store"
        env = {k: str(v) for k, v in spec["environment"].items()}
        assert spec["environment"]["MODELS_DIR"] == "/data/models"
        assert duration_seconds(spec["stop_grace_period"]) > drain_seconds(env), name
        logs = [v for v in spec["volumes"] if v.endswith(":" + env["LOG_DIR"])]
        assert logs == [f"{name}-logs:{env['LOG_DIR']}"], "logs per replica"


# ---------------------------------------------------------------- Kubernetes

def test_manifests_pass_the_kubernetes_schemas_strictly():
    for path, doc in manifests():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_no_real_secret_is_applied_from_the_manifest_directory():
    applied = [doc["kind"] for path in K8S_DIR.glob("*.yaml")
               for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert "Secret" not in applied
    placeholders = manifest("Secret")["stringData"].values()
    assert all(value.startswith("REPLACE") or value == "" for value in placeholders)


def test_k8s_environment_is_valid_server_settings():
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    containers = (*pod["containers"], *pod["initContainers"])
    # Helpers such as POD_IP or PUBLIC_HOSTS are only allowed as parts of a setting's value.
    used = {name for container in containers for var in container.get("env", [])
            for name in re.findall(r"\$\((\w+)\)", var.get("value", ""))}
    for container in containers:
        env = k8s_environment(container)
        assert set(env) - used <= SETTING_NAMES, set(env) - used - SETTING_NAMES
        assert not re.search(r"\$\(\w+\)", json.dumps(env)), "unresolved $(VAR)"
        config = load_config({k: v for k, v in env.items() if k in SETTING_NAMES})
        assert config.APP_ENV == "production"
    config = load_config({k: v for k, v in k8s_environment(server_container()).items()
                          if k in SETTING_NAMES})
    assert config.REPLICA_NAME == "llm-server-7d9c-abcde"
    assert {"10.1.2.3", PROBE_HOST, "llm.example.com", "llm-server"} <= set(config.ALLOWED_HOSTS)
    assert str(config.PORT) == manifest("Deployment")["spec"]["template"]["metadata"][
        "annotations"]["prometheus.io/port"]


def test_k8s_probes_grace_and_wiring():
    deployment = manifest("Deployment")
    pod = deployment["spec"]["template"]
    container = server_container()
    assert deployment["spec"]["replicas"] == 3
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["failureThreshold"] >= 3
    assert probe_paths(container["readinessProbe"]["exec"]["command"]) == ["/api/v1/health"]
    (port,) = container["ports"]
    env = k8s_environment(container)
    assert port["containerPort"] == int(env["PORT"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + drain_seconds(env)
    service = manifest("Service")
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    labels = pod["metadata"]["labels"]
    for selector in (service["spec"]["selector"],
                     manifest("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     deployment["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    claim = manifest("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounted[env["MODELS_DIR"]]["persistentVolumeClaim"]["claimName"] == \
        claim["metadata"]["name"]
    (init,) = pod["spec"]["initContainers"]
    assert init["command"] == ["python", "scripts/install_model.py"]
    assert init["volumeMounts"] == container["volumeMounts"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_k8s_runs_as_non_root_without_capabilities():
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for container in (*pod["containers"], *pod["initContainers"]):
        security = container["securityContext"]
        assert security["capabilities"]["drop"] == ["ALL"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert container["image"] == server_container()["image"]


# ---------------------------------------------------------------- against the server itself

@pytest.fixture(scope="module")
def served(tmp_path_factory, model_file, model_registry):
    """An app with the Kubernetes context settings and a settings key, on a live server."""
    from conftest import LiveServer
    env = k8s_environment(server_container())
    app = build_test_app(tmp_path_factory.mktemp("deploy"), model_file, model_registry,
                         N_CTX=env["N_CTX"], N_PARALLEL=env["N_PARALLEL"],
                         API_KEYS="probe-key")
    server = LiveServer(app)
    yield server
    server.stop()
    app.extensions["llm"].close()


def test_k8s_memory_request_covers_the_servers_estimate(served):
    reply = served.app.test_client().get(
        "/api/v1/models", headers={"Authorization": "Bearer probe-key"})
    assert reply.status_code == 200, reply.get_json()
    (model,) = reply.get_json()["models"]
    estimate = model["memory_estimate_bytes"]
    resources = server_container()["resources"]
    request = quantity_bytes(resources["requests"]["memory"])
    assert request >= estimate + PROCESS_OVERHEAD_BYTES, (request, estimate)
    assert quantity_bytes(resources["limits"]["memory"]) >= request


def deployment_paths() -> set[str]:
    """Every path a probe, healthcheck or scraper of the deployment files asks for."""
    container = server_container()
    paths = {container[p]["httpGet"]["path"] for p in ("livenessProbe", "startupProbe")}
    paths.update(probe_paths(container["readinessProbe"]["exec"]["command"]))
    paths.add(manifest("Deployment")["spec"]["template"]["metadata"]["annotations"][
        "prometheus.io/path"])
    for spec in replicas(compose()["services"]).values():
        paths.update(probe_paths(spec["healthcheck"]["test"][1:]))
    nginx_check = compose()["services"]["nginx"]["healthcheck"]["test"]
    paths.add("/" + nginx_check[-1].split("/", 3)[3])
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    paths.update(job["metrics_path"] for job in scrape["scrape_configs"])
    return paths


def test_every_probed_path_is_a_route_of_the_app(served):
    paths = deployment_paths()
    assert {"/health", "/api/v1/health", "/metrics"} <= paths
    adapter = served.app.url_map.bind("localhost")
    for path in paths:
        adapter.match(path, method="GET")  # raises NotFound / MethodNotAllowed


@pytest.mark.parametrize("path", ["/health", "/api/v1/health"])
def test_healthcheck_script_passes_with_the_settings_key_and_fails_without(served, path):
    port = served.url.rsplit(":", 1)[1]
    base = {"APP_ENV": "testing", "PORT": port, "PATH": "/usr/bin:/bin"}

    def run(**env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/healthcheck.py", path],
                              env={**base, **env}, cwd=ROOT, capture_output=True, text=True,
                              timeout=60)

    good = run(API_KEYS="probe-key")
    assert good.returncode == 0, good.stdout + good.stderr
    wrong = run(API_KEYS="not-the-key")
    # /health needs no key; the readiness report does.
    assert wrong.returncode == (0 if path == "/health" else 1), wrong.stdout + wrong.stderr
    assert shlex.split(good.stdout)[-1] == "200"
