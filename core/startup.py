"""What `meterlane serve` says when it starts: where its configuration, database and limit
counters are, what it loaded, where it answers; and what is missing for a call to work."""

from __future__ import annotations

from sqlalchemy.engine import make_url

from core.config import Config


def summary(config: Config, plan_ids: list[str], address: str, workers: int,
            config_path: str | None) -> list[str]:
    """The start-up lines (without the `meterlane: ` prefix), warnings last."""
    database = ("embedded SQLite " + config.database_url[len("sqlite:///"):]
                if config.embedded else
                make_url(config.database_url).render_as_string(hide_password=True))
    limits = (f"Redis {make_url(config.redis_url).render_as_string(hide_password=True)} "
              f"(keys {config.redis_prefix}*)" if config.redis_url
              else "the database (set MLANE_REDIS_URL to share fast counters)")
    models = ", ".join(m.name for m in config.models) or "none"
    lines = [
        f"config    {config_path or 'none (MLANE_CONFIG is not set)'}",
        f"database  {database}",
        f"limits    {limits}",
        f"models    {len(config.models)}: {_cut(models)}",
        f"plans     {len(plan_ids)}: {_cut(', '.join(plan_ids) or 'none')}",
        f"serving   {address} with {workers} workers (API document {address}/openapi.json)",
    ]
    return lines + [f"warning: {w}" for w in warnings(config, config_path)]


def warnings(config: Config, config_path: str | None) -> list[str]:
    """What stops a model call from working, said at start rather than at the first call."""
    found = []
    if not config_path:
        found.append("no config is loaded, so there is no model to call: `meterlane init` "
                     "writes a commented example to start from; point MLANE_CONFIG at it")
    elif not config.models:
        found.append(f"{config_path} declares no [[models]]: there is no model to call")
    for upstream in config.upstreams:
        if upstream.api_key_env and not upstream.api_key:
            users = [m.name for m in config.models if m.upstream == upstream.name]
            found.append(f"upstream {upstream.name!r} reads its key from "
                         f"${upstream.api_key_env}, which is not set: calls to "
                         f"{_cut(', '.join(users) or 'its models')} go without a key")
    return found


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
