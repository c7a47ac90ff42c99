"""The migrations build exactly the schema the models describe (alembic's autogenerate
comparison finds nothing to add, drop or alter) on Postgres and on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Engine

from core.db import Base, make_engine

pytestmark = pytest.mark.integration


def differences(engine: Engine) -> list[object]:
    import app  # noqa: F401 - every model registered on Base.metadata

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return [d for d in compare_metadata(context, Base.metadata)
                if not (isinstance(d, tuple) and d[0] == "remove_table"
                        and d[1].name == "alembic_version")]


def test_postgres_schema_matches_the_models(clean_db: Engine) -> None:
    assert differences(clean_db) == []


def test_sqlite_schema_matches_the_models(tmp_path: Path) -> None:
    from migrations.schema import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade(engine)
    try:
        assert differences(engine) == []
    finally:
        engine.dispose()


# -- a database made by the layout before the move to the design card's (meterlane/ wrapper) --

OLD_LAYOUT = "bbcda7b5b3464679ad68a811bfea80be5c6f991e"  # the last commit with meterlane/


def _old_code(tmp_path: Path) -> Path:
    """The service's code at OLD_LAYOUT, from this checkout's history."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: the old layout's code cannot be read")
    shallow = subprocess.run(["git", "-C", str(root), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True, check=False).stdout.strip()
    if shallow == "true":
        pytest.skip("a shallow clone: the old layout's commit is not in its history")
    out = tmp_path / "old"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", OLD_LAYOUT, "meterlane"],
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def _old_cli(code: Path, url: str, *args: str) -> str:
    import os
    import subprocess
    import sys

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLANE_")},
           "MLANE_DATABASE_URL": url, "MLANE_DATA_DIR": str(code / "var")}
    done = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1));"
                           " from meterlane.cli import main; main()", str(code), *args],
                          env=env, capture_output=True, text=True, timeout=120, check=False,
                          cwd=code)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_a_database_made_by_the_old_layout_upgrades_with_this_code(
        backend: str, tmp_path: Path, pg_server: str) -> None:
    from core.auth import AuthService
    from migrations.schema import current_revision, head_revision, upgrade
    from tests.support.services import create_database

    code = _old_code(tmp_path)
    url = (create_database(pg_server, "mlane_old_layout_" + _worker_suffix())
           if backend == "postgres" else f"sqlite:///{tmp_path / 'old.db'}")
    _old_cli(code, url, "db", "upgrade")
    key = _old_cli(code, url, "keys", "create", "--role", "app", "--app", "acme")
    engine = make_engine(url)
    try:
        before = current_revision(engine)
        assert before is not None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert differences(engine) == []
        # what the old code wrote is still there, and this code reads it
        principal = AuthService(engine, cache_seconds=0).authenticate(key)
        assert principal.app_id is not None
    finally:
        engine.dispose()


def _worker_suffix() -> str:
    import os

    return os.environ.get("PYTEST_XDIST_WORKER", "main")


# -- the check at start-up reads both revisions without alembic ------------------------------


def _alembic_revisions(engine: Engine) -> tuple[str | None, str]:
    from alembic.script import ScriptDirectory

    from migrations.schema import HERE

    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head = ScriptDirectory(str(HERE)).get_current_head()
    assert head is not None
    return current, head


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_revisions_are_read_as_alembic_reads_them(backend: str, tmp_path: Path,
                                                  pg_server: str) -> None:
    from migrations.schema import current_revision, head_revision, upgrade
    from tests.support.services import create_database

    url = (create_database(pg_server, "mlane_revisions_" + _worker_suffix())
           if backend == "postgres" else f"sqlite:///{tmp_path / 'r.db'}")
    engine = make_engine(url)
    try:
        assert (current_revision(engine), head_revision()) == _alembic_revisions(engine)
        assert current_revision(engine) is None
        upgrade(engine, "0024")
        assert (current_revision(engine), head_revision()) == _alembic_revisions(engine)
        assert current_revision(engine) == "0024" != head_revision()
        upgrade(engine)
        assert (current_revision(engine), head_revision()) == _alembic_revisions(engine)
    finally:
        engine.dispose()


def test_a_second_head_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from migrations import schema

    copy = tmp_path / "migrations"
    shutil.copytree(schema.HERE / "versions", copy / "versions")
    (copy / "versions" / "9999_branch.py").write_text(
        "revision = '9999'\ndown_revision = '0025'\n")
    monkeypatch.setattr(schema, "HERE", copy)
    with pytest.raises(RuntimeError, match=r"2 heads \(0026, 9999\)"):
        schema.head_revision()

