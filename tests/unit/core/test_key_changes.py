"""Keys are made, rotated and revoked only by core.keys.KeyService, which audits each change:
the service's own code has no other way to store a key or revoke one (AuthService only
authenticates). Tests and benchmarks may still store a key directly (core.auth.issue_in)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SERVICE = ("app.py", "core", "plans", "metering", "paywall", "finance", "gateway",
           "migrations")
# a call of issue_in (not its definition), or a write of revoked_at
WRITES = re.compile(r"(?<!def )\bissue_in\(|\.values\([^)]*\brevoked_at=")


def test_only_the_key_service_stores_or_revokes_a_key() -> None:
    files = [p for top in SERVICE for p in (
        [ROOT / top] if top.endswith(".py") else sorted((ROOT / top).rglob("*.py")))]
    found = [f"{path.relative_to(ROOT)}:{n}" for path in files
             if path.relative_to(ROOT) != Path("core/keys.py")
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if WRITES.search(line)]
    assert len(files) > 100 and found == []
