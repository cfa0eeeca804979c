"""README.md against the code: every setting, every metric and every public route.

Pure: reads the option lists, builds the Prometheus registries of a node and a router and
the aiohttp apps without starting anything (no Kafka, no network).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from stickystate.node.http import build_app as build_node_app
from stickystate.node.metrics import NodeMetrics
from stickystate.node.settings import NodeSettings
from stickystate.node.store import NodeStore
from stickystate.router.app import build_app as build_router_app
from stickystate.router.cluster import Cluster
from stickystate.router.metrics import RouterMetrics
from stickystate.router.settings import RouterSettings
from stickystate import config
from stickystate.cli import UP
from stickystate.config import Option

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
NODES = (("n1", "http://127.0.0.1:1"),)
# The code's path parameter names -> the README's (and docs/openapi.yaml's).
PARAM_NAMES = {"sid": "id"}

COMMANDS: dict[str, list[Option]] = {
    "node": config.NODE + config.KAFKA,
    "router": config.ROUTER,
    "up": UP,
}


def section(heading: str) -> str:
    """The README text under ``heading`` (a whole line), up to the next heading of any level
    (``#`` lines inside fenced code blocks are not headings)."""
    lines = README.splitlines()
    assert heading in lines, f"README.md has no section {heading!r}"
    out: list[str] = []
    fenced = False
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            break
        out.append(line)
    return "\n".join(out)


def table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table row in ``text`` (header and separator rows included)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.lstrip().startswith("|")]


# -- settings ----------------------------------------------------------------------------------


def shown_default(value: Any) -> str:
    """How the README writes a default: on/off, 3600 not 3600.0, "" for empty."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value == "":
        return '""'
    return str(value)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_setting_is_in_the_readme_with_its_env_and_default(command: str) -> None:
    rows = {r[0]: r for r in table_rows(section(f"### `stickystate {command}`")) if r[0].startswith("`--")}
    for opt in COMMANDS[command]:
        row = rows.get(f"`{opt.flag}`")
        assert row is not None, f"stickystate {command}: {opt.flag} missing from README.md"
        assert f"`{opt.env}`" in row[1], f"stickystate {command} {opt.flag}: env var {opt.env} not in {row[1]!r}"
        if opt.name == "kafka_bootstrap":
            assert "`KAFKA_BOOTSTRAP`" in row[1], "the KAFKA_BOOTSTRAP alias is not documented"
        assert row[2] == f"`{shown_default(opt.default)}`", f"stickystate {command} {opt.flag}: default {row[2]!r}"
        assert row[3], f"stickystate {command} {opt.flag}: no meaning given"
    stale = set(rows) - {f"`{o.flag}`" for o in COMMANDS[command]}
    assert not stale, f"stickystate {command}: README.md documents options the command does not have: {stale}"


def test_every_flag_and_env_var_appears_in_the_readme() -> None:
    for command, options in COMMANDS.items():
        for opt in options:
            assert f"`{opt.flag}`" in README, (command, opt.flag)
            assert f"`{opt.env}`" in README, (command, opt.env)


# -- metrics -------------------------------------------------------------------------------------


def node_metrics() -> NodeMetrics:
    # NodeStore construction connects to nothing (Kafka clients start in NodeStore.start()).
    return NodeMetrics(NodeStore(NodeSettings(auth="open")))


def router_metrics() -> RouterMetrics:
    return RouterMetrics(Cluster(RouterSettings(nodes=NODES, auth="open")))


def metric_table(owner: Any) -> dict[str, tuple[str, set[str], dict[str, set[str]]]]:
    """exposed name -> (type, label names, label values seen) of everything ``owner.registry`` exposes."""
    registry: CollectorRegistry = owner.registry
    labelnames = {w._name: set(w._labelnames) for w in vars(owner).values() if isinstance(w, MetricWrapperBase)}
    out = {}
    for family in registry.collect():
        exposed = family.name + "_total" if family.type == "counter" else family.name
        labels = set(labelnames.get(family.name, ()))
        values: dict[str, set[str]] = {}
        for sample in family.samples:
            for k, v in sample.labels.items():
                if k != "le":
                    labels.add(k)
                    values.setdefault(k, set()).add(v)
        out[exposed] = (family.type, labels, values)
    return out


@pytest.mark.parametrize("who", ["node", "router"])
def test_every_metric_is_in_the_readme_with_type_and_labels(who: str) -> None:
    table = metric_table(node_metrics() if who == "node" else router_metrics())
    assert len(table) >= (18 if who == "node" else 8), sorted(table)  # sanity: the registry was built
    rows = {r[0].strip("`"): r for r in table_rows(section("## Observability")) if r[0].startswith("`stickystate_")}
    for name, (kind, labels, values) in table.items():
        row = rows.get(name)
        assert row is not None, f"{who} metric {name} missing from README.md (Observability)"
        assert row[1] == kind, f"{name}: README says {row[1]!r}, the registry {kind!r}"
        documented = set(re.findall(r"`(\w+)`", row[2]))
        assert documented == labels, f"{name}: README labels {documented}, the registry's {labels}"
        assert row[3], f"{name}: no meaning given"
        for value in values.get("role", ()):  # the fixed label values are explained in the meaning
            assert f"`{value}`" in row[3], f"{name}: role {value!r} not explained"


def test_the_readme_documents_no_metric_the_code_does_not_have() -> None:
    exposed = set(metric_table(node_metrics())) | set(metric_table(router_metrics()))
    documented = {r[0].strip("`") for r in table_rows(section("## Observability")) if r[0].startswith("`stickystate_")}
    assert documented - exposed == set()


# -- routes -----------------------------------------------------------------------------------------


def public_routes() -> set[tuple[str, str]]:
    node_app = build_node_app(NodeSettings(auth="open"))
    router_app = build_router_app(RouterSettings(nodes=NODES, auth="open"))
    out = set()
    for app in (node_app, router_app):
        for route in app.router.routes():
            if route.method in ("HEAD", "*") or route.resource is None:
                continue  # HEAD: added by add_get; "*": the router's forwarders of the node's routes
            path = re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: "{" + PARAM_NAMES.get(m.group(1), m.group(1)) + "}",
                          route.resource.canonical)
            if not path.startswith("/internal/"):
                out.add((route.method, path))
    return out


def test_every_public_route_is_in_the_readme() -> None:
    routes = public_routes()
    assert {("GET", "/v1/sessions/{id}/history"), ("GET", "/metrics"), ("GET", "/v1/cluster")} <= routes  # sanity
    for method, path in sorted(routes):
        assert re.search(re.escape(f"`{method} {path}") + r"[`?]", README), f"{method} {path} missing from README.md"


def test_access_control_section_covers_keys_tenants_and_secrets() -> None:
    text = section("## Access control")
    for needle in ("Authorization: Bearer <key>", "X-Api-Key", "401 unauthorized", "429 rate_limited",
                   "Retry-After", "X-Stickystate-Internal", "--api-keys-file", "--api-keys", "key=tenant",
                   "--internal-secret", "--rate-limit-rps", "--rate-limit-burst", "--auth open"):
        assert needle in text, needle


def test_every_file_the_docs_name_exists() -> None:
    """README.md and docs/ARCHITECTURE.md name modules by path (`node/store.py`,
    `stickystate/http/wire.py`): each one exists, so the map does not drift from the code."""
    named: set[str] = set()
    for doc in (README, (ROOT / "docs" / "ARCHITECTURE.md").read_text()):
        named |= set(re.findall(r"`((?:stickystate|node|router|replicator|bench|chaos|tests)/[\w/]*\.py)`", doc))
    assert len(named) > 20
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert missing == []
