"""The compose file's wiring, run as plain processes: every Weir service of
deploy/docker-compose.yml starts with its compose command and environment (host names mapped to
127.0.0.1, each fixed port to a free one, Redis to the test's), then a session conversation and a
budgeted request go through the router with the Python client.

    python deploy/compose_topology.py WEIR_BINARY REDIS_URL KEY_PREFIX

Run by services/weir/tests/compose_topology.rs, which deletes the keys under KEY_PREFIX.
"""

import os
import re
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import yaml

from weir.budget.v1 import budget_pb2, budget_pb2_grpc
from weir_client import Weir

import grpc

weir, redis_url, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
compose = yaml.safe_load(open(os.path.join(root, "deploy", "docker-compose.yml")))
hosts = set(compose["services"])
redis = urlparse(redis_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ports = {}


def port(number: str) -> str:
    """The free port standing for compose's fixed `number`."""
    if number not in ports:
        ports[number] = str(free_port())
    return ports[number]


def interpolate(value: str) -> str:
    """`${VAR:-default}` and `${VAR}` as compose reads them (from this environment)."""
    return re.sub(
        r"\$\{(\w+)(?::-([^}]*))?\}",
        lambda m: os.environ.get(m.group(1)) or m.group(2) or "",
        value,
    )


def rewrite(key: str, value: str) -> str:
    """A compose value as it must be on this host."""
    value = interpolate(str(value))
    if value.startswith("redis://"):
        return redis_url
    # host:port and scheme://host:port of a compose service, or a 0.0.0.0 listen address.
    def local(match):
        host, number = match.group(1), match.group(2)
        if host in hosts or host == "0.0.0.0":
            return f"127.0.0.1:{port(number)}"
        return match.group(0)

    return re.sub(r"([A-Za-z0-9_.-]+):(\d{4,5})", local, value)


weir_services = {
    name: service
    for name, service in compose["services"].items()
    if service.get("command", [None])[0] == "serve"
}
# Dependencies first, as compose's depends_on orders them.
order = []
while len(order) < len(weir_services):
    for name, service in weir_services.items():
        needs = [d for d in service.get("depends_on", {}) if d in weir_services]
        if name not in order and all(d in order for d in needs):
            order.append(name)

processes = []
try:
    addresses = {}
    for name in order:
        service = weir_services[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIR_", "OTEL_"))}
        for key, value in service["environment"].items():
            if key == "OTEL_EXPORTER_OTLP_ENDPOINT":
                continue  # no Jaeger here
            env[key] = rewrite(key, value)
        # The mounted config file, no metrics port (several processes), keys under the prefix.
        env["WEIR_CONFIG"] = os.path.join(root, "deploy", "weir.toml")
        env["WEIR_TELEMETRY__METRICS_LISTEN"] = ""
        env["RUST_LOG"] = "warn"
        for table in ("SESSION", "BUDGET", "REVIEW", "ROUTER__RATE_LIMIT"):
            env[f"WEIR_{table}__KEY_PREFIX"] = prefix
        listen = env[f"WEIR_{name.upper()}__LISTEN"]
        addresses[name] = listen
        processes.append(
            subprocess.Popen([weir] + service["command"], env=env, stdout=subprocess.DEVNULL)
        )
        # As compose's health check does: wait until the service serves.
        deadline = time.time() + 30
        while subprocess.run(
            [weir, "health", listen, "--timeout", "1s"], capture_output=True
        ).returncode != 0:
            if time.time() > deadline:
                raise SystemExit(f"{name} did not become healthy at {listen}")
            time.sleep(0.2)
        print(f"{name:<10} healthy at {listen}")

    with Weir(addresses["router"], session_target=addresses["session"]) as client:
        session = client.create_session("topology", model="sim-small")
        first = client.complete("My name is Ada.", model="sim-small", session_id=session)
        second = client.complete("What is my name?", model="sim-small", session_id=session)
        assert second.usage.input_tokens > first.usage.input_tokens, "the session carried context"
        assert first.cost_micros > 0 and second.cost_micros > 0, "the router meters requests"
        budget = budget_pb2_grpc.BudgetServiceStub(grpc.insecure_channel(addresses["budget"]))
        spend = budget.GetSpend(
            budget_pb2.GetSpendRequest(
                scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, id="")
            )
        )
        charged = first.cost_micros + second.cost_micros
        assert spend.total_micros == charged, (spend.total_micros, charged)
        print(f"session {session}: input tokens {first.usage.input_tokens} -> "
              f"{second.usage.input_tokens}; spend {spend.total_micros} micro-USD recorded")
finally:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
