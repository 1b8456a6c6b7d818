"""The deploy files, checked without a container engine or systemd: the
compose files hang together (services, volumes, mounted files, the hosts
the configs name) and their configs pass `dialgate check-config`; the
Dockerfile copies what exists and runs the README's command; the systemd
units pass `systemd-analyze verify`; the NATS config passes `nats-server -t`.
The image itself is built and run in tests/test_docker.py."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import SinkConfig, load

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DIALGATE = Path(sys.executable).parent / "dialgate"
COMPOSE_FILES = ["compose.yaml", "compose.jetstream.yaml"]
IMAGE = "dialgate:latest"
CONFIG_IN_IMAGE = "/etc/dialgate/dialgate.toml"
# What an operator exports before `docker compose up` (the files name these).
COMPOSE_VARIABLES = {"POSTGRES_PASSWORD": "pw-for-the-test", "DIALGATE_ADMIN_KEY": "adm_deploy_test_key"}


def compose(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))
    return data


def interpolate(value: str) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}`, with the
    variables the files are documented to need (and no others)."""

    def one(match: re.Match[str]) -> str:
        name, op = match.group(1), match.group(2) or ""
        if name in COMPOSE_VARIABLES:
            return COMPOSE_VARIABLES[name]
        assert op.startswith(":-"), f"${{{name}}} is neither set by the operator's documented exports nor defaulted"
        return op[2:]

    return re.sub(r"\$\{([A-Z0-9_]+)(:[-?][^}]*)?\}", one, value)


def dialgate_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in data["services"].items() if s.get("image") == IMAGE}


def config_of(service: dict[str, Any]) -> Path:
    """The host file mounted as the service's config."""
    for volume in service.get("volumes", []):
        source, _, target = volume.partition(":")
        if target.split(":")[0] == CONFIG_IN_IMAGE:
            return (DEPLOY / source).resolve()
    raise AssertionError(f"no config mounted at {CONFIG_IN_IMAGE}")


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in (service.get("environment") or {}).items()}


def jetstream_sink_built() -> bool:
    return "jetstream" in str(typing.get_type_hints(SinkConfig)["kind"])


def needs_sink(path: Path) -> None:
    if 'kind = "jetstream"' in path.read_text(encoding="utf-8") and not jetstream_sink_built():
        pytest.skip(f"{path.name} names the JetStream sink, which this build does not have yet")


def subcommands() -> set[str]:
    text = subprocess.run([str(DIALGATE), "--help"], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"\{([a-z,-]+)\}", text)
    assert found, text
    return set(found.group(1).split(","))


# -- compose --------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_services_volumes_and_files_hang_together(name: str) -> None:
    data = compose(name)
    services: dict[str, dict[str, Any]] = data["services"]
    declared = set(data.get("volumes") or {})
    for service_name, service in services.items():
        for target, condition in (service.get("depends_on") or {}).items():
            assert target in services, (service_name, target)
            if condition["condition"] == "service_healthy":
                assert "test" in services[target].get("healthcheck", {}), (service_name, target)
            else:
                assert condition["condition"] == "service_completed_successfully"
                assert services[target].get("restart") == "no", target
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), (service_name, source)
            else:
                assert source in declared, (service_name, source)
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()
    built = [s for s in services.values() if "build" in s]
    assert built and all(s["image"] == IMAGE for s in built)
    # Every service that runs the image is built by this file.
    assert all("build" in s for s in dialgate_services(data).values())


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_gateways_reach_the_services_the_file_runs(name: str) -> None:
    data = compose(name)
    services = data["services"]
    gateways = {n: s for n, s in dialgate_services(data).items() if s.get("command", ["serve"])[0] == "serve"}
    assert gateways
    for service_name, service in gateways.items():
        path = config_of(service)
        needs_sink(path)
        settings = load(path, environment_of(service))
        hosts = {urlsplit(settings.storage.url).hostname, urlsplit(settings.redis.url).hostname}
        if settings.sink.kind != "database":
            hosts |= {urlsplit(url).hostname for url in getattr(settings.sink, "servers")}  # noqa: B009
        assert hosts <= set(services), (service_name, hosts - set(services))
        # The password reaches the URL, and the admin key the keys.
        assert COMPOSE_VARIABLES["POSTGRES_PASSWORD"] in settings.storage.url
        assert settings.admin.keys == [COMPOSE_VARIABLES["DIALGATE_ADMIN_KEY"]]
        port = settings.server.bind.rpartition(":")[2]
        assert any(p.endswith(f":{port}") for p in service["ports"]), service_name


@pytest.mark.parametrize("name,service_name", [(n, s) for n in COMPOSE_FILES for s in dialgate_services(compose(n))])
def test_compose_dialgate_services_pass_check_config(name: str, service_name: str) -> None:
    service = compose(name)["services"][service_name]
    command = service.get("command", ["serve", "--config", CONFIG_IN_IMAGE])
    if command[0] not in subcommands():
        pytest.skip(f"`dialgate {command[0]}` is not in this build yet")
    assert command[1:] == ["--config", CONFIG_IN_IMAGE]
    path = config_of(service)
    needs_sink(path)
    result = subprocess.run([str(DIALGATE), "check-config", str(path)], env=environment_of(service),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ok (1 projects)" in result.stdout


def test_jetstream_config_names_the_design_keys_and_passes_without_them(tmp_path: Path) -> None:
    # Checked whether or not this build has the sink (the tests above run
    # the whole file once it has).
    import tomllib

    service = compose("compose.jetstream.yaml")["services"]["gateway-1"]
    raw = tomllib.loads(config_of(service).read_text(encoding="utf-8"))
    sink = raw.pop("sink")
    assert set(sink) == {"kind", "servers", "stream", "replicas", "duplicate_window_seconds"}
    assert sink["kind"] == "jetstream" and sink["replicas"] == 3
    nodes = {n for n in compose("compose.jetstream.yaml")["services"] if n.startswith("nats-")}
    assert {urlsplit(url).hostname for url in sink["servers"]} == nodes
    rest = tmp_path / "without-sink.toml"
    rest.write_text(re.sub(r"(?ms)^\[sink\].*?(?=^\[)", "", config_of(service).read_text(encoding="utf-8")),
                    encoding="utf-8")
    assert "[sink]" not in rest.read_text(encoding="utf-8")
    result = subprocess.run([str(DIALGATE), "check-config", str(rest)], env=environment_of(service),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_compose_variables_are_the_documented_ones() -> None:
    text = "".join((DEPLOY / name).read_text(encoding="utf-8") for name in COMPOSE_FILES)
    assert set(re.findall(r"\$\{([A-Z0-9_]+)", text)) == set(COMPOSE_VARIABLES)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert all(name in readme for name in COMPOSE_VARIABLES)


# -- the Dockerfile -------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments out."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_copies_what_the_context_holds() -> None:
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else is left out of the context
    sources = [args.split()[:-1] for op, args in dockerfile() if op == "COPY" and "--from" not in args]
    assert sources
    for names in sources:
        for source in names:
            assert source.rstrip("/") in kept, source
            assert (ROOT / source).exists(), source


def test_dockerfile_runs_the_readme_command_as_a_user_on_the_image_config() -> None:
    steps = dockerfile()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    values = dict(final)
    assert values["ENTRYPOINT"] == '["dialgate"]'
    assert values["CMD"] == f'["serve", "--config", "{CONFIG_IN_IMAGE}"]'
    assert "dialgate serve --config" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert values["USER"].split(":")[0] not in ("0", "root")
    assert f"deploy/dialgate.toml {CONFIG_IN_IMAGE}" in [args for op, args in final if op == "COPY"]
    settings = load(DEPLOY / "dialgate.toml", {})
    port = settings.server.bind.rpartition(":")[2]
    assert settings.server.bind.startswith("0.0.0.0:") and values["EXPOSE"] == port
    assert f"http://127.0.0.1:{port}/healthz" in values["HEALTHCHECK"]
    # SQLite in the volume.
    assert values["VOLUME"] == '["/var/lib/dialgate"]'
    assert settings.storage.url == "sqlite+aiosqlite:////var/lib/dialgate/dialgate.db"


def test_image_config_passes_check_config(tmp_path: Path) -> None:
    result = subprocess.run([str(DIALGATE), "check-config", str(DEPLOY / "dialgate.toml")], cwd=tmp_path, env={},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ok (0 projects)" in result.stdout


# -- systemd ---------------------------------------------------------------------


UNITS = {"dialgate.service": "serve", "dialgate-load.service": "load"}


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / name, encoding="utf-8")
    return parser


@pytest.mark.parametrize("name", UNITS)
def test_systemd_units_run_dialgate_hardened(name: str) -> None:
    service = unit(name)["Service"]
    assert service["ExecStart"] == f"/opt/dialgate/bin/dialgate {UNITS[name]} --config /etc/dialgate/dialgate.toml"
    for key, value in {"DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():
        assert service.get(key) == value, key
    if name == "dialgate.service":
        assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
        assert service["StateDirectory"] == "dialgate"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", UNITS)
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    # verify wants ExecStart's program to exist: point it at this install.
    text = (DEPLOY / "systemd" / name).read_text(encoding="utf-8")
    copy = tmp_path / name
    copy.write_text(text.replace("/opt/dialgate/bin/dialgate", str(DIALGATE)), encoding="utf-8")
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on an unknown key or a bad value, saying so: nothing may be said.
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr + result.stdout


# -- NATS ------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")
def test_nats_config_is_valid_and_lists_the_compose_nodes() -> None:
    result = subprocess.run(["nats-server", "-c", str(DEPLOY / "nats.conf"), "-t"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    routes = set(re.findall(r"nats-route://([a-z0-9-]+):6222", (DEPLOY / "nats.conf").read_text(encoding="utf-8")))
    nodes = {n for n in compose("compose.jetstream.yaml")["services"] if n.startswith("nats-")}
    assert routes == nodes and len(nodes) == 3
