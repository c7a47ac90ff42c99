"""What `meterlane serve` says at start: where everything is, what was loaded, what is
missing for a call to work."""

from __future__ import annotations

from pathlib import Path

from core.config import Config
from core.startup import summary

EXAMPLE = Path(__file__).parents[3] / "core" / "examples" / "meterlane.toml"


def test_no_config_says_there_is_no_model_and_how_to_get_one(tmp_path: Path) -> None:
    config = Config.from_env({"MLANE_DATA_DIR": str(tmp_path)})
    lines = summary(config, [], "http://127.0.0.1:8080", 2, None)
    assert lines[0] == "config    none (MLANE_CONFIG is not set)"
    assert lines[1] == f"database  embedded SQLite {tmp_path / 'meterlane.db'}"
    assert lines[3] == "models    0: none"
    assert [w for w in lines if w.startswith("warning:")] == [
        "warning: no config is loaded, so there is no model to call: `meterlane init` writes "
        "a commented example to start from; point MLANE_CONFIG at it"]


def test_the_example_config_names_its_models_and_an_unset_key(tmp_path: Path) -> None:
    env = {"MLANE_CONFIG": str(EXAMPLE), "MLANE_DATABASE_URL":
           "postgresql+psycopg://meter:s3cret@db.internal/meterlane",
           "MLANE_REDIS_URL": "redis://:hush@cache:6379/0"}
    config = Config.from_env(env)
    lines = summary(config, ["free", "pro", "team"], "http://0.0.0.0:8080", 4, str(EXAMPLE))
    text = "\n".join(lines)
    assert "s3cret" not in text and "hush" not in text  # passwords are never printed
    assert "database  postgresql+psycopg://meter:***@db.internal/meterlane" in lines
    assert "limits    Redis redis://:***@cache:6379/0 (keys ml:*)" in lines
    assert "models    3: gpt-4o-mini, o3-mini, llama-local" in lines
    assert "plans     3: free, pro, team" in lines
    assert lines[-1] == ("warning: upstream 'openai' reads its key from $OPENAI_API_KEY, which "
                         "is not set: calls to gpt-4o-mini, o3-mini go without a key")
    with_key = Config.from_env({**env, "OPENAI_API_KEY": "sk-test"})
    assert not [w for w in summary(with_key, [], "x", 1, str(EXAMPLE))
                if w.startswith("warning:")]
