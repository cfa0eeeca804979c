"""docker-compose.yml / Dockerfile checked against the code, without Docker.

Valid settings come from ``stickystate.config`` and the commands are run through
``stickystate.cli.build_parser``, so renaming an option or changing a command breaks this test
instead of silently producing a cluster that runs on defaults.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from stickystate.router.settings import parse_nodes
from stickystate import config, credentials
from stickystate.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

NODES = ("n1", "n2", "n3")
APP_SERVICES = (*NODES, "router")

# Options each subcommand reads from STICKYSTATE_* (mirrors what build_parser wires up).
COMMAND_OPTIONS: dict[str, list[config.Option]] = {
    "node": config.NODE + config.KAFKA,
    "router": config.ROUTER,
}
# Settings every service must set explicitly (defaults are for a laptop, not for containers).
REQUIRED: dict[str, set[str]] = {
    "node": {"node_id", "host", "port", "partitions", "kafka_bootstrap"},
    "router": {"host", "port", "nodes", "partitions"},
}
# Non-STICKYSTATE_ alias accepted by config.add_options.
KAFKA_ALIAS = "KAFKA_BOOTSTRAP"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment as compose passes it to the container (strings)."""
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    env: dict[str, str] = {}
    for key, value in raw.items():
        assert value is not None, f"{key} has no value (would be taken from the host)"
        assert not isinstance(value, bool), f"{key}: quote booleans in compose environment"
        env[str(key)] = str(value)
    return env


def command_of(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    assert cmd, "service has no command"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def subcommand_of(svc: dict[str, Any]) -> str:
    cmd = command_of(svc)
    assert cmd[0] == "stickystate", f"command must run the stickystate console script: {cmd}"
    assert len(cmd) >= 2 and cmd[1] in COMMAND_OPTIONS, f"unexpected subcommand: {cmd}"
    return cmd[1]


def options_by_env(subcommand: str) -> dict[str, config.Option]:
    return {o.env: o for o in COMMAND_OPTIONS[subcommand]}


def flags_of(svc: dict[str, Any]) -> dict[str, str]:
    """``--flag value`` / ``--flag=value`` pairs after the subcommand."""
    args, flags = command_of(svc)[2:], {}
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"unexpected argument {arg!r}"
        if "=" in arg:
            key, value = arg.split("=", 1)
        else:
            assert i + 1 < len(args), f"{arg} has no value"
            key, value = arg, args[i + 1]
            i += 1
        flags[key] = value
        i += 1
    return flags


def expected_settings(svc: dict[str, Any]) -> dict[str, Any]:
    """Option name -> value the service asks for (flag > env, as in config.add_options)."""
    sub = subcommand_of(svc)
    env, flags = env_of(svc), flags_of(svc)
    out: dict[str, Any] = {}
    for opt in COMMAND_OPTIONS[sub]:
        if opt.flag in flags:
            out[opt.name] = opt.type(flags[opt.flag])
        elif opt.env in env:
            out[opt.name] = opt.type(env[opt.env])
        elif opt.name == "kafka_bootstrap" and KAFKA_ALIAS in env:
            out[opt.name] = opt.type(env[KAFKA_ALIAS])
    return out


def healthcheck_urls(svc: dict[str, Any]) -> list[Any]:
    test = svc.get("healthcheck", {}).get("test")
    assert test, "service has no healthcheck"
    text = test if isinstance(test, str) else " ".join(map(str, test))
    return [urlsplit(u) for u in re.findall(r"https?://[^\s'\"]+", text)]


def listeners(spec: str) -> dict[str, str]:
    """``"PLAINTEXT://kafka:9092,CONTROLLER://:9093"`` -> {"PLAINTEXT": "kafka:9092", ...}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, addr = part.partition("://")
        assert sep, f"bad listener {part!r}"
        out[name] = addr
    return out


def published_ports(svc: dict[str, Any]) -> list[tuple[int, int]]:
    """(published, target) pairs from short ("[ip:]host:container") or long port syntax."""
    pairs = []
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            pairs.append((int(p["published"]), int(p["target"])))
        else:
            *head, target = str(p).split("/")[0].split(":")
            assert head, f"port {p!r} is not published on a fixed host port"
            pairs.append((int(head[-1]), int(target)))
    return pairs


@pytest.fixture
def parse(services: dict[str, dict[str, Any]],
          monkeypatch: pytest.MonkeyPatch) -> Callable[[str], argparse.Namespace]:
    """Run build_parser() on a service's command with exactly that service's environment.

    build_parser() reads STICKYSTATE_* for every subcommand, so a variable that is invalid for
    another subcommand (e.g. STICKYSTATE_NODES, an int for ``up``) fails here as it would in the
    container."""

    def run(name: str) -> argparse.Namespace:
        svc = services[name]
        with monkeypatch.context() as mp:
            for key in list(os.environ):
                if key.startswith("STICKYSTATE_") or key == KAFKA_ALIAS:
                    mp.delenv(key)
            for key, value in env_of(svc).items():
                mp.setenv(key, value)
            ns = build_parser().parse_args(command_of(svc)[1:])
        return ns

    return run


@pytest.fixture
def parsed(parse: Callable[[str], argparse.Namespace]) -> dict[str, argparse.Namespace]:
    return {name: parse(name) for name in APP_SERVICES}


# ----------------------------------------------------------------------------- tests


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert {"kafka", *APP_SERVICES} <= set(services)


def test_kafka_is_kraft_combined(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    image, _, tag = kafka["image"].partition(":")
    assert image == "apache/kafka"
    assert tag and int(tag.split(".")[0]) >= 4, "pin an apache/kafka 4.x tag"
    env = env_of(kafka)
    assert {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")} == {"broker", "controller"}
    voters = [v.split("@")[0] for v in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")]
    assert env["KAFKA_NODE_ID"] in voters
    protocols = dict(p.split(":", 1) for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners(env["KAFKA_LISTENERS"]) and controller in protocols
    for name in listeners(env["KAFKA_ADVERTISED_LISTENERS"]):
        assert name in listeners(env["KAFKA_LISTENERS"]) and protocols.get(name) == "PLAINTEXT", name
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert kafka.get("healthcheck", {}).get("test"), "kafka needs a healthcheck for depends_on"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_env_vars_are_real_options(services: dict[str, dict[str, Any]], name: str) -> None:
    svc = services[name]
    sub = subcommand_of(svc)
    # secrets are environment variables without a flag (stickystate/credentials.py)
    valid = set(options_by_env(sub)) | {credentials.SECRET_ENV, credentials.KEYS_ENV}
    if sub == "node":
        valid.add(credentials.MASTER_KEYS_ENV)
    env = env_of(svc)
    unknown = sorted(k for k in env if k.startswith("STICKYSTATE_") and k not in valid)
    assert not unknown, f"{name} (stickystate {sub}) sets unknown settings {unknown}; valid: {sorted(valid)}"
    if KAFKA_ALIAS in env:
        assert "kafka_bootstrap" in {o.name for o in COMMAND_OPTIONS[sub]}, f"{name} does not use Kafka"
    valid_flags = {o.flag for o in COMMAND_OPTIONS[sub]}
    unknown_flags = sorted(set(flags_of(svc)) - valid_flags)
    assert not unknown_flags, f"{name} passes unknown flags {unknown_flags}"
    missing = REQUIRED[sub] - set(expected_settings(svc))
    assert not missing, f"{name} relies on defaults for {sorted(missing)}"


def test_expected_commands(services: dict[str, dict[str, Any]]) -> None:
    for name in NODES:
        assert subcommand_of(services[name]) == "node"
    assert subcommand_of(services["router"]) == "router"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_command_parses_with_compose_env(services: dict[str, dict[str, Any]],
                                         parse: Callable[[str], argparse.Namespace], name: str) -> None:
    svc = services[name]
    sub = subcommand_of(svc)
    ns = parse(name)
    assert ns.command == sub
    expected = expected_settings(svc)
    assert expected
    for opt_name, value in expected.items():
        assert getattr(ns, opt_name) == value, f"{name}: parsed {opt_name}={getattr(ns, opt_name)!r} != {value!r}"
    assert ns.host == "0.0.0.0", f"{name} must listen on all interfaces inside its container"


def test_nodes_match_router(services: dict[str, dict[str, Any]],
                            parsed: dict[str, argparse.Namespace]) -> None:
    router_nodes = dict(parse_nodes(parsed["router"].nodes))
    ids = [parsed[n].node_id for n in NODES]
    assert len(set(ids)) == len(ids), f"node ids not unique: {ids}"
    assert set(ids) == set(router_nodes), f"router nodes {sorted(router_nodes)} != node ids {sorted(ids)}"
    for name in NODES:
        ns = parsed[name]
        url = urlsplit(router_nodes[ns.node_id])
        assert url.hostname == name, f"router reaches {ns.node_id} at {url.hostname}, service is {name}"
        assert url.port == ns.port, f"router uses port {url.port} for {name}, node listens on {ns.port}"
        checks = healthcheck_urls(services[name])
        assert checks, f"{name} healthcheck has no URL"
        for check in checks:
            assert check.path == "/livez"
            assert check.hostname in ("127.0.0.1", "localhost")
            assert check.port == ns.port, f"{name} healthcheck port {check.port} != node port {ns.port}"


def test_router_published_port(services: dict[str, dict[str, Any]],
                               parsed: dict[str, argparse.Namespace]) -> None:
    port = parsed["router"].port
    assert (port, port) in published_ports(services["router"])


def test_router_waits_for_nodes(services: dict[str, dict[str, Any]]) -> None:
    deps = services["router"].get("depends_on", {})
    assert set(NODES) <= set(deps)
    for name in NODES:
        dep = services[name]["depends_on"]["kafka"]
        assert dep["condition"] == "service_healthy"


def test_partitions_agree(parsed: dict[str, argparse.Namespace]) -> None:
    partitions = {name: ns.partitions for name, ns in parsed.items()}
    assert len(set(partitions.values())) == 1, f"partitions differ: {partitions}"


def test_nodes_use_kafka_advertised_listener(services: dict[str, dict[str, Any]],
                                             parsed: dict[str, argparse.Namespace]) -> None:
    env = env_of(services["kafka"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    hosts = set(advertised.values())
    for name in NODES:
        bootstrap = parsed[name].kafka_bootstrap
        assert bootstrap in hosts, f"{name} bootstrap {bootstrap!r} not in kafka's advertised {sorted(hosts)}"
        host = bootstrap.rsplit(":", 1)[0]
        assert host == "kafka" or host == services["kafka"].get("hostname"), host


def _dockerfile_instructions() -> Iterator[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            yield op.upper(), rest.strip()


def test_dockerfile_installs_project() -> None:
    instr = list(_dockerfile_instructions())
    assert instr[0] == ("FROM", "python:3.11-slim")
    assert any(op == "COPY" and rest.split()[0] == "." for op, rest in instr), "project is not copied"
    installs = [shlex.split(rest) for op, rest in instr if op == "RUN" and "pip install" in rest]
    assert any(".[server]" in tokens for tokens in installs), "Dockerfile does not `pip install .[server]`"
    users = [rest for op, rest in instr if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "image must run as a non-root user"
    exposed = {int(p) for op, rest in instr if op == "EXPOSE" for p in rest.split()}
    assert {8100, 8101} <= exposed


def test_console_script_exists() -> None:
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert "stickystate" in scripts
    module, _, attr = scripts["stickystate"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_dockerignore_keeps_sources() -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    package_dirs = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"].values()
    needed = ["pyproject.toml"] + sorted(set(package_dirs))
    assert all((ROOT / d).is_dir() for d in needed[1:])
    for path in needed:
        hit = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(path, p)]
        assert not hit, f".dockerignore drops {path} (via {hit})"


# ----------------------------------------------------------------------------- three brokers

BROKERS3_FILE = ROOT / "docker-compose.brokers3.yml"


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, for what these files use: mappings merge key by
    key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merge(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override}
    return override


@pytest.fixture(scope="module")
def services3(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    merged = _merge(compose, yaml.safe_load(BROKERS3_FILE.read_text()))
    return merged["services"]  # type: ignore[no-any-return]


def test_three_brokers_form_one_quorum_at_rf3_min_insync_2(services3: dict[str, dict[str, Any]]) -> None:
    brokers = ("kafka", "kafka2", "kafka3")
    envs = [env_of(services3[b]) for b in brokers]
    assert [e["KAFKA_NODE_ID"] for e in envs] == ["1", "2", "3"]
    assert len({e["CLUSTER_ID"] for e in envs}) == 1 and len(envs[0]["CLUSTER_ID"]) == 22
    voters = {v.split("@")[0]: v.split("@")[1] for v in envs[0]["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")}
    assert voters == {"1": "kafka:9093", "2": "kafka2:9093", "3": "kafka3:9093"}
    for name, env in zip(brokers, envs):
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == envs[0]["KAFKA_CONTROLLER_QUORUM_VOTERS"]
        assert listeners(env["KAFKA_ADVERTISED_LISTENERS"]) == {"PLAINTEXT": f"{name}:9092"}
        assert listeners(env["KAFKA_LISTENERS"])["CONTROLLER"] == ":9093"
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        assert (env["KAFKA_DEFAULT_REPLICATION_FACTOR"], env["KAFKA_MIN_INSYNC_REPLICAS"]) == ("3", "2")
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert services3[name]["image"] == services3["kafka"]["image"]
        assert services3[name].get("healthcheck", {}).get("test")


def test_three_broker_nodes_bootstrap_from_every_broker(services3: dict[str, dict[str, Any]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NODES:
        svc = services3[name]
        assert {"kafka", "kafka2", "kafka3"} <= set(svc["depends_on"])
        with monkeypatch.context() as mp:
            for key in list(os.environ):
                if key.startswith("STICKYSTATE_") or key == KAFKA_ALIAS:
                    mp.delenv(key)
            for key, value in env_of(svc).items():
                mp.setenv(key, value)
            ns = build_parser().parse_args(command_of(svc)[1:])
        assert ns.kafka_bootstrap.split(",") == ["kafka:9092", "kafka2:9092", "kafka3:9092"]
        assert ns.node_id == name and ns.replication_factor == 0  # 0: min(3, brokers) = 3
