"""Fixtures: real Postgres and Redis (env URLs or embedded), a fake upstream, app and keys."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from core.auth import Role
from core.config import Config, load_toml
from core.db import make_engine
from tests.support.cluster import ClusterUnavailableError, start_cluster
from tests.support.services import create_database, postgres_url, redis_url
from tests.support.upstream import FakeUpstream


def _tables() -> str:
    """Every table of the models (the app imports them all): none is left out of a clean."""
    import app  # noqa: F401
    from core.db import Base

    return ", ".join(t.name for t in Base.metadata.sorted_tables)


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def service_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def pg_server(service_root: Path) -> Iterator[str]:
    url, stop = postgres_url(service_root)
    yield url
    stop()


@pytest.fixture(scope="session")
def redis_server(service_root: Path) -> Iterator[str]:
    url, stop = redis_url(service_root)
    yield url
    stop()


@pytest.fixture(scope="session")
def redis_cluster(service_root: Path) -> Iterator[list[tuple[str, int]]]:
    """Startup nodes [(host, port)] of this worker's own 3-master Redis Cluster on loopback."""
    try:
        nodes, stop = start_cluster(service_root)
    except ClusterUnavailableError as exc:
        pytest.skip(f"no Redis Cluster: {exc}")
    yield nodes
    stop()


@pytest.fixture(scope="session")
def pg_url(pg_server: str) -> str:
    """This worker's own migrated database on the test server."""
    from migrations.schema import upgrade

    url = create_database(pg_server, f"mlane_test_{_worker()}")
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture()
def clean_db(pg_engine: Engine) -> Engine:
    with pg_engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {_tables()} RESTART IDENTITY CASCADE"))
    return pg_engine


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def gateway_toml(base_url: str, *, dead_url: str = "http://127.0.0.1:9/v1") -> str:
    """A config with a priced cloud-style model, an unpriced local one, and a dead upstream."""
    return f"""
[[upstreams]]
name = "cloud"
base_url = "{base_url}"
api_key = "sk-upstream-secret"
timeout = 3

[[upstreams]]
name = "local-gpu"
base_url = "{base_url}"

[[upstreams]]
name = "down"
base_url = "{dead_url}"
connect_timeout = 1

[[models]]
name = "gpt-4o-mini"
upstream = "cloud"
price = {{ input = "0.15", cached_input = "0.075", output = "0.60" }}

[[models]]
name = "o3-mini"
upstream = "cloud"
price = {{ input = "1.10", cached_input = "0.55", output = "4.40", reasoning = "4.40" }}

[[models]]
name = "llama-local"
upstream = "local-gpu"
upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
tokenizer = "cl100k_base"

[[models]]
name = "text-embedding-3-small"
upstream = "cloud"
price = {{ input = "0.02", output = "0" }}

[[models]]
name = "ghost"
upstream = "down"
price = {{ input = "1", output = "1" }}
"""


def config_from_toml(toml: str, tmp_path: Path, **overrides: Any) -> Config:
    path = tmp_path / "meterlane.toml"
    path.write_text(toml)
    settings = load_toml(path, {})
    base = Config(data_dir=str(tmp_path / "var"), key_cache_seconds=0, **settings)
    return replace(base, **overrides)


@dataclass
class Keys:
    app: str
    other_app: str
    admin: str
    finance: str


@pytest.fixture()
def app_config(clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> Config:
    return config_from_toml(gateway_toml(upstream.base_url), tmp_path, database_url=pg_url)


@pytest.fixture()
def app(app_config: Config) -> Any:
    from app import create_app

    flask_app = create_app(app_config)
    yield flask_app
    flask_app.extensions["wiring"].engine.dispose()


@pytest.fixture()
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture()
def keys(app: Any) -> Keys:
    return make_keys(app)


def make_keys(app: Any) -> Keys:
    """An app key of "acme" and of "globex", an admin key and a finance key of "acme"."""
    service = app.extensions["wiring"].keys
    return Keys(
        app=service.create_key(Role.APP, "acme").key,
        other_app=service.create_key(Role.APP, "globex").key,
        admin=service.create_key(Role.ADMIN, None).key,
        finance=service.create_key(Role.FINANCE, "acme").key,
    )


def bearer(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


@pytest.fixture(scope="session")
def fake_stripe() -> Iterator[str]:
    """The base URL of a fake Stripe API on loopback (tests/support/fakestripe.py), shared by
    the session's tests."""
    with fake_stripe_server() as url:
        yield url


@contextlib.contextmanager
def fake_stripe_server() -> Iterator[str]:
    """A fake Stripe of one's own (its objects seen by no other test)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.fakestripe", "--port", "0"],
                            cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "listening on PORT", printed once the port is bound
        if not line.startswith("listening on "):
            raise RuntimeError(f"the fake Stripe server did not start: {line!r}")
        yield f"http://127.0.0.1:{line.split()[-1]}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
