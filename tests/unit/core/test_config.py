"""Config: env variables, the TOML file, exact prices and clear errors."""

from decimal import Decimal
from pathlib import Path

import pytest

from core.config import Config, ConfigError

TOML = """
[[upstreams]]
name = "openai"
base_url = "https://api.openai.com/v1/"
api_key_env = "OPENAI_API_KEY"

[[upstreams]]
name = "local-gpu"
base_url = "http://127.0.0.1:8000/v1"

[[models]]
name = "gpt-4o-mini"
upstream = "openai"
price = { input = "0.15", cached_input = "0.075", output = 0.60 }

[[models]]
name = "llama"
upstream = "local-gpu"
upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_from_env_reads_file_and_resolves_api_key_from_env(tmp_path: Path) -> None:
    env = {"MLANE_CONFIG": write(tmp_path, TOML), "OPENAI_API_KEY": "sk-test",
           "MLANE_DATA_DIR": str(tmp_path)}
    config = Config.from_env(env)
    assert config.database_url == f"sqlite:///{tmp_path}/meterlane.db"
    assert config.embedded and config.should_auto_migrate
    openai = config.upstream("openai")
    assert openai.api_key == "sk-test" and openai.base_url == "https://api.openai.com/v1"
    mini = config.model("gpt-4o-mini")
    assert mini is not None and mini.price is not None
    assert mini.price.output == Decimal("0.60") and isinstance(mini.price.output, Decimal)
    llama = config.model("llama")
    assert llama is not None and llama.upstream_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert llama.price is None
    assert config.upstream("local-gpu").api == "chat"  # the default


def test_an_upstream_may_speak_the_responses_api(tmp_path: Path) -> None:
    text = TOML.replace('api_key_env = "OPENAI_API_KEY"',
                        'api_key_env = "OPENAI_API_KEY"\napi = "responses"')
    config = Config.from_env({"MLANE_CONFIG": write(tmp_path, text)})
    assert config.upstream("openai").api == "responses"


def test_postgres_is_not_auto_migrated(tmp_path: Path) -> None:
    config = Config.from_env({"MLANE_DATABASE_URL": "postgresql+psycopg://x@h/db"})
    assert not config.embedded and not config.should_auto_migrate


@pytest.mark.parametrize(("snippet", "message"), [
    ('[[models]]\nname = "m"\nupstream = "nope"\n', "upstream 'nope' is not defined"),
    ('[[upstreams]]\nname = "u"\nbase_url = "ftp://x"\n', "must start with http"),
    ('[[upstreams]]\nname = "u"\nbase_url = "http://x"\n[[models]]\nname = "m"\n'
     'upstream = "u"\nprice = { input = "-1", output = "1" }\n', "non-negative"),
    ('[[upstreams]]\nname = "u"\nbase_url = "http://x"\n[[models]]\nname = "m"\n'
     'upstream = "u"\nprice = { input = "1" }\n', "price.output is required"),
    ('[[upstreams]]\nname = "u"\nbase_url = "http://x"\n[[models]]\nname = "m"\n'
     'upstream = "u"\nprice = { input = "0.00000001", output = "1" }\n', "6 decimal places"),
    ("not toml [", "c.toml"),
    ('[[model]]\nname = "m"\n', "unknown settings \\['model'\\]"),
    (TOML + TOML[TOML.index("[[models]]"):], "two models are named 'gpt-4o-mini'"),
    (TOML + '[[upstreams]]\nname = "local-gpu"\nbase_url = "http://x"\n',
     "two upstreams are named 'local-gpu'"),
    (TOML + '[[aliases]]\nname = "auto"\nmodels = ["gpt-4o-mini"]\n'
     '[[aliases]]\nname = "auto"\nmodels = ["gpt-4o-mini"]\n', "two aliases are named 'auto'"),
    (TOML + '[[aliases]]\nname = "auto"\nmodels = ["gpt-4o-mini", "gpt-5"]\n',
     "alias 'auto': 'gpt-5' is not a model"),
    (TOML + '[[aliases]]\nname = "llama"\nmodels = ["gpt-4o-mini"]\n',
     "a model has this name"),
    (TOML + '[[aliases]]\nname = "auto"\nmodels = []\n', "non-empty list"),
    (TOML.replace('upstream_model =', 'level = 4\nupstream_model ='), "level must be 1"),
    (TOML.replace('base_url = "http://127.0.0.1:8000/v1"',
                  'base_url = "http://127.0.0.1:8000/v1"\nmax_concurrency = 0'),
     "max_concurrency must be"),
    (TOML.replace('base_url = "http://127.0.0.1:8000/v1"',
                  'base_url = "http://127.0.0.1:8000/v1"\nbreaker_cooldown = -1'),
     "breaker_cooldown must be"),
    (TOML.replace('base_url = "http://127.0.0.1:8000/v1"',
                  'base_url = "http://127.0.0.1:8000/v1"\ntimeout = 1e300'), "timeout must be"),
    (TOML.replace('output = 0.60', 'output = "1e30"'), "more than 20,000 USD"),
    (TOML.replace('base_url = "http://127.0.0.1:8000/v1"',
                  'base_url = "http://127.0.0.1:8000/v1"\nconnect_timeout = "soon"'),
     "connect_timeout must be"),
    (TOML.replace('base_url = "http://127.0.0.1:8000/v1"',
                  'base_url = "http://127.0.0.1:8000/v1"\ncost = { hardware_per_hour = "1e30" }'),
     "hardware_per_hour must be a decimal from 0 to 100,000"),
    (TOML.replace('base_url = "http://127.0.0.1:8000/v1"',
                  'base_url = "http://127.0.0.1:8000/v1"\ncost = { power_watts = "1e12" }'),
     "power_watts must be"),
    (TOML.replace('base_url = "http://127.0.0.1:8000/v1"',
                  'base_url = "http://127.0.0.1:8000/v1"\napi = "assistants"'),
     "api must be \"chat\" or \"responses\""),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, snippet: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env({"MLANE_CONFIG": write(tmp_path, snippet)})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_env({"MLANE_CONFIG": str(tmp_path / "missing.toml")})
