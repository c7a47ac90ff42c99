"""What a gunicorn worker holds after create_app: not what only migrations, Stripe or a
counted call need (alembic with mako, stripe with requests and httpx, the tokenizers'
vocabularies: about 75 MB of each worker's RSS together; bench/idle_rss.py measures it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOADED = ("import sys; from app import create_app; app = create_app(); "
          "tokenizers = app.extensions['wiring'].metering.tokenizers; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])), "
          "tokenizers.built)")
HEAVY = ("alembic", "mako", "stripe", "requests", "httpx")


def _create_app(tmp_path: Path) -> str:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLANE_")},
           "MLANE_DATA_DIR": str(tmp_path / "var")}
    done = subprocess.run([sys.executable, "-c", LOADED, *HEAVY], env=env, cwd=ROOT,
                          text=True, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_worker_imports_no_migrations_stripe_or_vocabulary(tmp_path: Path) -> None:
    # the embedded database migrates itself at the first start: only then is alembic needed
    assert _create_app(tmp_path) == "['alembic', 'mako'] ()"
    assert _create_app(tmp_path) == "[] ()"
