"""docs/openapi.yaml is the contract: a schema-driven fuzzer (schemathesis) runs every
phase against a real local cluster (router, three nodes, Kafka) and finds no
disagreement between what the spec says and what the server accepts and answers.

Checks: every built-in one but ``use_after_free`` (below), so at least
not_a_server_error, status_code_conformance, content_type_conformance,
response_headers_conformance, response_schema_conformance, negative_data_rejection,
positive_data_acceptance; phases examples, coverage, fuzzing and stateful (the spec's
links between create, read, write and delete). Fixed seed, bounded time, one worker.

What is configured, and why (``CONFIG``):
- positive_data_acceptance also accepts 412: a schema-valid write with ``If-Match`` of
  another version is refused by the session's state, not by its data (RFC 9110 13.1.1),
  as 404 (no such session) and 409 (the id exists) are by default.
- negative_data_rejection also accepts 413: the server answers a limit it enforces
  (``max_len`` above ``max_list_len``, bodies over ``max_body_bytes``) with 413
  ``too_large`` naming the limit, as the spec documents.
- ``use_after_free`` is left out: ``GET /v1/sessions/{id}/history`` of a deleted session
  answers 200 by design (an audit read of the id's partition, across its lifetimes; it
  lists nothing once erased), while that check expects every read under a deleted
  session's path to be 404. The session itself is 404 after a delete (checked by
  ``ensure_resource_availability`` and the stateful phase).
- ``GET /v1/sessions/{id}/watch`` (operationId ``watchSession``) is excluded: for an
  existing session its 200 is a Server-Sent Events stream that ends only when the session
  goes or its shard moves, and schemathesis reads a whole body before it checks anything,
  so a generated request for one of the existing ids would hang the run. tests/test_watch.py
  covers it instead (the stream, each 400 of its parameters, 404, 429, 503) and
  tests/test_openapi.py checks that the spec and the route table agree on it.
- The long-poll parameter ``wait_s`` of ``GET /v1/sessions/{id}`` is fixed at 0.2 s: a
  request whose ``If-None-Match`` names the session's version waits ``wait_s`` (up to
  25 s) before its 304, which a fuzzer would pay many times within the time budget.
  Both answers (200 at once, 304 after the wait) are still exercised; its 400s are in
  tests/test_watch.py.
- Half of the generated ids are ids of sessions that exist (a dictionary), half of the
  keys and list fields are ones those sessions hold, and the spec's example ids exist
  before the run: otherwise nearly every generated write addresses an absent session or
  key, and the fuzzer learns nothing past the 404.

Warnings: schemathesis warns of a "schema validation mismatch" when, in one phase, no
schema-valid request of an operation was served; ``EXPLAINED`` lists the operations
where that can happen by design, with the reason (deleting a key, deleting a session). Any other warning
fails the test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stickystate.local_cluster import LocalCluster, http_json

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "openapi.yaml"
KEY = "contract-key-0123456789abcdef"
SEED = 20261202
MAX_TIME_S = 90
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection,positive_data_acceptance,missing_required_header,"
          "unsupported_method,allow_header_conformance,ensure_resource_availability,ignored_auth")
EXISTING = [f"fz-{i}" for i in range(10)]
EXAMPLE_IDS = ["cart-42", "chat-7", "login-9"]

CONFIG = f"""
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

[dictionaries.existing]
values = {EXISTING!r}

[dictionaries.keys]
values = ["otp"]

[dictionaries.fields]
values = ["messages"]

[parameters]
"path.id" = {{ dictionary = "existing", probability = 0.5 }}
"path.key" = {{ dictionary = "keys", probability = 0.5 }}
"path.field" = {{ dictionary = "fields", probability = 0.5 }}
"query.wait_s" = "0.2"
"""

# Operations whose schema-valid requests can all be refused by state within one phase, with
# the reason. (The spec gives no If-Match examples: they would name versions the example
# sessions have left behind after their first write.)
EXPLAINED: dict[str, str] = {
    "DELETE /v1/sessions/{id}/keys/{key}": (
        "the examples and coverage phases send the spec's example request (login-9, key otp) "
        "again and again; only the first can remove the key, every later one is refused by the "
        "session's state: 404 once the key (or, after deleteSession ran, the session) is gone, 412 "
        "for If-Match: * on a gone session. Seen in CI on a faster machine, where more cases ran "
        "per phase; the fuzzing phase serves plenty of schema-valid deletes (about a third 200)."),
    "DELETE /v1/sessions/{id}": (
        "the same by the session: a delete needs a session that exists, and the ids the phases "
        "send are the spec's example (removed by the first delete that reaches it) or generated "
        "ones that name no session, both answered 404 as the spec says. Seen once in a fresh-clone "
        "run (session 7) among 4 that passed; which phase ran more cases decides it."),
}


@pytest.fixture(scope="module")
def cluster_options() -> dict[str, Any]:
    return {"auth": "keys", "api_keys": f"{KEY}=contract", "internal_secret": "contract-secret-0123456789"}


def seed_sessions(cluster: LocalCluster) -> None:
    import urllib.request

    for sid in EXISTING + EXAMPLE_IDS:
        body = f'{{"id": "{sid}", "data": {{"messages": [], "otp": 1}}}}'.encode()
        req = urllib.request.Request(cluster.router_url + "/v1/sessions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            assert resp.status == 201


def test_the_fuzzer_finds_no_disagreement_with_the_spec(cluster: LocalCluster, tmp_path: Path) -> None:
    seed_sessions(cluster)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", str(SPEC),
         "--url", cluster.router_url, "--checks", CHECKS, "--phases", "examples,coverage,fuzzing,stateful",
         "--max-time", str(MAX_TIME_S), "--workers", "1", "--exclude-operation-id", "watchSession", "--seed", str(SEED), "--no-color",
         "-H", f"Authorization: Bearer {KEY}"],
        capture_output=True, text=True, timeout=MAX_TIME_S + 240, cwd=tmp_path)
    out = run.stdout + run.stderr
    summary = out[out.find("=== SUMMARY"):] if "=== SUMMARY" in out else out[-3000:]
    print(out[out.find("=== WARNINGS"):] if "=== WARNINGS" in out else summary)
    assert run.returncode == 0, out[-20000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts is not None, summary
    generated, passed = int(counts.group(1)), int(counts.group(2))
    assert generated >= 200 and passed == generated, summary
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in out, (phase, summary)
    assert "Failures:" not in summary
    assert cluster_healthy(cluster)
    mismatch = re.search(r"Schema validation mismatch:.*?\n\n((?:  - .*\n)+)", out)
    warned = set(re.findall(r"  - (.*)", mismatch.group(1))) if mismatch else set()
    assert warned <= EXPLAINED.keys(), f"unexplained schema validation mismatch warnings: {warned - EXPLAINED.keys()}"
    other = [line for line in re.findall(r"⚠️ (.*)", summary) if not line.startswith("Schema validation mismatch")]
    assert other == [], other


def cluster_healthy(cluster: LocalCluster) -> bool:
    """The fuzzing left the cluster serving (no node crashed or stopped answering)."""
    status, view = http_json(cluster.router_url + "/v1/cluster", headers={"Authorization": f"Bearer {KEY}"})
    return status == 200 and all(n["healthy"] for n in view["nodes"])
