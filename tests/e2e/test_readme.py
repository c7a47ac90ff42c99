"""The READMEs are tested: every fenced block of README.md, sdk/python/README.md,
sdk/typescript/README.md and bench/README.md is something a user will paste (the TypeScript
README's `ts` blocks run in its own suite, sdk/typescript/test/readme.test.mjs).

- TOML blocks parse and validate, as a whole file or merged into the example config that
  `meterlane init` writes (a block names the sections it changes; the rest is the example's);
- every `meterlane ...` command line parses against the real command group;
- every curl line runs against a real `meterlane serve` with the example config (its
  upstreams pointed at the model simulator) and gets an answer from a route that exists, with
  the key it was given, and no server error;
- Python blocks compile; README.md's (the openai and anthropic packages) run against it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import pytest

from core.config import Config, ConfigError, settings_from
from tests.conftest import fake_stripe_server
from tests.e2e.test_serve import cli, start_server, stop
from tests.support.consent import http_call

ROOT = Path(__file__).parents[2]
READMES = ("README.md", "sdk/python/README.md", "sdk/typescript/README.md", "bench/README.md")
EXAMPLE = ROOT / "core" / "examples" / "meterlane.toml"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(lang: str) -> list[tuple[str, str]]:
    """(where, text) of every fenced block of the language, where = file:line."""
    found = []
    for name in READMES:
        text = (ROOT / name).read_text()
        for m in FENCE.finditer(text):
            if m[1] == lang:
                found.append((f"{name}:{text.count(chr(10), 0, m.start()) + 1}", m[2]))
    return found


# -- TOML ---------------------------------------------------------------------------------

KEYS = {"upstreams": "name", "models": "name", "aliases": "name", "plans": "id",
        "credit_packs": "id"}


def merged(base: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    """The example with the block's sections: an entry replaces the example's of the same name
    (or id), a new one is added; a table's settings replace the example's."""
    out = dict(base)
    for section, value in block.items():
        if section in KEYS and isinstance(value, list):
            key = KEYS[section]
            names = [t.get(key) for t in value]
            out[section] = [t for t in base.get(section, []) if t.get(key) not in names] + value
        elif isinstance(value, dict) and isinstance(base.get(section), dict):
            out[section] = {**base[section], **value}
        else:
            out[section] = value
    return out


def validate(raw: dict[str, Any]) -> None:
    from plans.catalog import Catalog

    env = {"OPENAI_API_KEY": "sk-readme"}
    config = Config(**settings_from(raw, "", env))
    Catalog.from_config(config)


@pytest.mark.parametrize(("where", "text"), blocks("toml"), ids=lambda v: str(v)[:40])
def test_toml_blocks_are_valid_config(where: str, text: str) -> None:
    block = tomllib.loads(text, parse_float=Decimal)
    try:
        validate(block)  # a whole file
        return
    except ConfigError:
        pass
    example = tomllib.loads(EXAMPLE.read_text(), parse_float=Decimal)
    try:
        validate(merged(example, block))
    except ConfigError as exc:
        pytest.fail(f"{where}: not a valid config, alone or in the example config: {exc}")


def test_the_example_config_is_valid_and_uses_every_section() -> None:
    from core.config import SECTIONS

    raw = tomllib.loads(EXAMPLE.read_text(), parse_float=Decimal)
    validate(raw)
    assert sorted(raw) == sorted(SECTIONS)


# -- command lines -------------------------------------------------------------------------

def commands(text: str) -> list[list[str]]:
    """The commands of a shell block, each as its words: split at newlines, &&, ; and |
    (never inside quotes: a JSON body may span lines), comments dropped."""
    # (a comment runs to the end of its line, newline included: each line starts with ;)
    lexer = shlex.shlex(_lines_apart(text.replace("\\\n", " ")), posix=True,
                        punctuation_chars="();<>|&\n")
    lexer.whitespace, lexer.whitespace_split, lexer.commenters = " \t\r", True, "#"
    found: list[list[str]] = []
    words: list[str] = []
    for token in [*lexer, "\n"]:
        if token.strip("\n;|&") and token not in ("(", ")"):
            words.append(token)
            continue
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            words = words[1:]  # VAR=value command ...
        if words:
            found.append(words)
        words = []
    return found


def _lines_apart(text: str) -> str:
    """Each line outside quotes starts with `; ` (a command's end); a newline inside quotes
    (a JSON body spanning lines) is kept as it is, part of its word."""
    out, quote, comment = [], "", False
    for ch in text:
        if ch == "\n":
            comment = False
            out.append("\n" if quote else "\n; ")
            continue
        if not quote and not comment and ch == "#":
            comment = True
        elif not comment and ch in "'\"" and (not quote or quote == ch):
            quote = "" if quote else ch
        out.append(ch)
    return "".join(out)


def command_lines() -> list[tuple[str, list[str]]]:
    """Every `meterlane ...` command of the shell blocks, as its arguments."""
    return [(where, words[1:]) for lang in ("sh", "") for where, text in blocks(lang)
            for words in commands(text) if words[0] == "meterlane"]


def parse(args: list[str]) -> None:
    """Parse a command line as `meterlane` would, down to its last subcommand; raise click's
    UsageError if any part is wrong."""
    from app import main

    command: click.Command = main
    ctx = command.make_context("meterlane", list(args), resilient_parsing=False)
    while isinstance(command, click.Group):
        with warnings.catch_warnings():  # (click 8.2 moves protected_args into args)
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*ctx.protected_args, *ctx.args]
        if not rest:
            break
        _name, sub, more = command.resolve_command(ctx, rest)
        assert sub is not None
        command, ctx = sub, sub.make_context(_name or "", more, parent=ctx)


LINES = command_lines()


@pytest.mark.parametrize(("where", "args"), LINES, ids=[" ".join(a)[:40] for _, a in LINES])
def test_meterlane_command_lines_parse(where: str, args: list[str]) -> None:
    try:
        parse(args)
    except click.exceptions.Exit:
        pass  # --help, --version
    except click.UsageError as exc:
        pytest.fail(f"{where}: `meterlane {' '.join(args)}` does not parse: {exc}")


def test_the_checker_refuses_a_wrong_command_line() -> None:
    with pytest.raises(click.UsageError):
        parse(["report", "local", "--period", "2026-11", "--format", "csv"])
    with pytest.raises(click.UsageError):
        parse(["keys", "creat", "--role", "app"])
    parse(["report", "margins", "--period", "2026-11", "--group-by", "plan"])


# -- bench command lines -------------------------------------------------------------------

BENCH_LINES = [(where, words[1:]) for lang in ("sh", "") for where, text in blocks(lang)
               for words in commands(text)
               if words[0] == "python" and len(words) > 1 and words[1].startswith("bench/")]


# In a process of its own (a bench script may patch the standard library with gevent as it is
# imported): its own parse_args where it has one, its checks after argparse's included; else
# its main() up to argparse's answer, then stopped. argparse refuses with exit status 2.
_PARSE_BENCH = """
import argparse, runpy, sys
script, argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, ".")
found = runpy.run_path(script, run_name="bench_parse")
if "parse_args" in found:
    found["parse_args"](argv)
    sys.exit(0)
parse = argparse.ArgumentParser.parse_args
def parsed(self, *a, **kw):
    parse(self, *a, **kw)
    sys.exit(0)
argparse.ArgumentParser.parse_args = parsed
sys.argv = [script, *argv]
found["main"]()
sys.exit(3)  # main() returned without parsing its arguments
"""


def parse_bench(args: list[str]) -> int:
    """The exit status of parsing `python bench/x.py args` as the script does (0: parsed)."""
    done = subprocess.run([sys.executable, "-c", _PARSE_BENCH, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    return done.returncode


@pytest.mark.parametrize(("where", "args"), BENCH_LINES,
                         ids=[" ".join(a)[:50] for _, a in BENCH_LINES])
def test_bench_command_lines_parse(where: str, args: list[str]) -> None:
    assert (ROOT / args[0]).is_file(), f"{where}: no {args[0]}"
    status = parse_bench(args)
    assert status == 0, f"{where}: `python {' '.join(args)}` does not parse (exit {status})"


def test_the_bench_checker_refuses_a_wrong_command_line() -> None:
    assert len(BENCH_LINES) >= 10
    assert parse_bench(["bench/hotpath.py", "--setups", "postgres-limitless"]) == 2
    assert parse_bench(["bench/idle_rss.py", "--calls", "many"]) == 2
    assert parse_bench(["bench/idle_rss.py", "--calls", "30"]) == 0


# -- against a real serve ------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(pg_server: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, dict[str, str]]]:
    """`meterlane serve` with the example config, its upstreams the simulator and Stripe the
    fake one (checkout, subscriptions: the blocks that need Stripe); the keys the READMEs
    name, in the environment their blocks read them from."""
    from gateway.simulator import Simulator
    from tests.support.services import create_database

    tmp = tmp_path_factory.mktemp("readme")
    # a Stripe of its own: the README's ids ("pro", "100k") are other tests' too
    with Simulator() as sim, fake_stripe_server() as fake_stripe:
        config = re.sub(r'base_url = "[^"]+"', f'base_url = "{sim.base_url}"',
                        EXAMPLE.read_text()).replace(
            "[stripe]\n", f'[stripe]\napi_base = "{fake_stripe}"\n', 1)
        (tmp / "meterlane.toml").write_text(config)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
        url = create_database(pg_server, f"mlane_readme_{worker}")
        env = {**os.environ, "MLANE_DATABASE_URL": url,
               "MLANE_CONFIG": str(tmp / "meterlane.toml"),
               "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": "0",
               "OPENAI_API_KEY": "sk-simulator", "MLANE_STRIPE_API_KEY": "sk_test_readme",
               "MLANE_STRIPE_WEBHOOK_SECRET": "whsec_readme"}
        assert cli(env, "db", "upgrade").returncode == 0
        synced = cli(env, "plans", "sync")  # the plans' prices, in (fake) Stripe
        assert synced.returncode == 0, synced.stderr
        keys = {"ADMIN_KEY": cli(env, "keys", "create", "--role", "admin").stdout.split()[-1]}
        proc, base = start_server(env, tmp)
        try:
            # the app's keys from the admin's, over HTTP (a `meterlane keys create` each took
            # about 2.5 s of the set-up)
            for var, role in (("MLANE_KEY", "app"), ("FINANCE_KEY", "finance")):
                status, issued = http_call(base, keys["ADMIN_KEY"])(
                    "POST", "/v1/keys", {"role": role, "app": "my-app"})
                assert status == 201, issued
                keys[var] = str(issued["key"])
            yield base, {**env, **keys}
        finally:
            stop(proc)


def claimed_keys(comment: str) -> set[str]:
    """The top-level keys of the JSON a comment says a command answers (`# -> {...}`)."""
    keys, depth = set(), 0
    for m in re.finditer(r'[{}\[\]]|"(\w+)"\s*:', comment):
        token = m[0]
        if token in "{[":
            depth += 1
        elif token in "}]":
            depth -= 1
        elif depth == 1:
            keys.add(m[1])
    return keys


def curl_commands() -> list[tuple[str, list[str], set[str]]]:
    """Every curl command of the shell blocks, with the keys its `# -> {...}` comment (on
    its lines or the ones after it) says the answer has."""
    found = []
    for where, text in blocks("sh"):
        segments = re.split(r"(?m)^(?=curl )", text)
        claims = []
        for segment in segments:
            if not segment.startswith("curl "):
                continue
            # `# -> {...}` or `# or ...; -> {...}`, not a refusal's `# 422 -> {...}`
            arrow = re.search(r"#(?:(?!\b[45]\d\d\b)[^\n])*?->\s*(\{.*)", segment, re.S)
            comment = " ".join(line.split("#", 1)[-1] for line in arrow[1].splitlines()) \
                if arrow else ""
            claims.append(claimed_keys(comment))
        curls = [words for words in commands(text) if words[0] == "curl"]
        assert len(curls) == len(claims), where
        found += [(where, words, keys) for words, keys in zip(curls, claims, strict=True)]
    return found


CURLS = curl_commands()


def test_the_claims_are_read_from_the_comments() -> None:
    assert claimed_keys('{"balance": ..., "grants": [{"x": 1}], "a": {"b": 2}}') == {
        "balance", "grants", "a"}
    claimed = {k for _, words, keys in CURLS for k in keys
               if any(w.endswith("/users/user-42/credits") for w in words)}
    assert claimed == {"balance", "granted", "burned", "expired", "grants"}


@pytest.mark.parametrize(("where", "words", "keys"), CURLS,
                         ids=[" ".join(c[1])[8:60] for c in CURLS])
def test_curl_lines_reach_a_route_that_answers(served: tuple[str, dict[str, str]],
                                               where: str, words: list[str],
                                               keys: set[str]) -> None:
    base, env = served
    examples = ROOT / "core" / "examples"
    args = []
    for word in words:
        word = word.replace("http://127.0.0.1:8080", base)
        word = re.sub(r"\$([A-Z_]+)", lambda m: env.get(m[1], m[0]), word)
        if word.startswith("@") and (examples / word[1:]).exists():
            word = f"@{examples / word[1:]}"  # the example files `meterlane init` writes
        args.append(word)
    done = subprocess.run([*args, "-w", "\n%{http_code}"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    body, _, code = done.stdout.rpartition("\n")
    status = int(code or 0)
    # 404 from a route that exists (no such lease, user, ...) is an answer; a route that
    # does not exist is a claim that is not true
    missing = status == 404 and "requested URL was not found" in body
    assert status and status < 500 and status not in (401, 405) and not missing, \
        f"{where}: `{shlex.join(words)}` answered {status}: {body[:300]}"
    if keys and status < 300:  # what the README says it answers (a 4xx here is the
        # example's own input meeting this machine, e.g. a webhook host that does not resolve
        import json

        answer = json.loads(body)
        assert keys <= set(answer), f"{where}: the answer lacks {keys - set(answer)}: {body}"


@pytest.mark.parametrize(("where", "text"), blocks("python"), ids=lambda v: str(v)[:40])
def test_python_blocks_compile(where: str, text: str) -> None:
    compile(text, where, "exec")


def test_the_readme_python_blocks_run_against_the_service(
        served: tuple[str, dict[str, str]]) -> None:
    base, env = served
    for where, text in blocks("python"):
        if not where.startswith("README.md"):
            continue
        code = text.replace("http://127.0.0.1:8080", base).replace('"mlk_..."',
                                                                  repr(env["MLANE_KEY"]))
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, f"{where}:\n{done.stderr[-2000:]}"


SDK_PRELUDE = '''
from types import SimpleNamespace
prompt = "Summarise this ticket."
def my_model(prompt, max_tokens):  # the app's own model call, as the README supposes
    return SimpleNamespace(input_tokens=1187, output_tokens=min(max_tokens, 312))
'''


def publish_example_offer(base: str, key: str) -> None:
    """The offer of `meterlane init`'s offer.json ("pro-monthly"), published (a version of its
    own when another test published one before)."""
    import httpx

    auth = {"Authorization": f"Bearer {key}"}
    made = httpx.post(f"{base}/v1/paywall/offers", headers=auth,
                      content=(EXAMPLE.parent / "offer.json").read_bytes())
    assert made.status_code == 201, made.text
    done = httpx.post(f"{base}/v1/paywall/offers/pro-monthly/versions/"
                      f"{made.json()['version']}/publish", headers=auth)
    assert done.status_code == 200, done.text


def test_the_sdk_readme_runs_in_order_against_the_service(
        served: tuple[str, dict[str, str]]) -> None:
    """The SDK README's blocks, one after the other as a reader pastes them, sync and async
    (the webhook handler runs in a Flask app: below)."""
    base, env = served
    publish_example_offer(base, env["MLANE_KEY"])
    code = SDK_PRELUDE + "\n".join(
        text for where, text in blocks("python")
        if where.startswith("sdk/") and "def hook" not in text)
    code = code.replace("http://127.0.0.1:8080", base).replace('"mlk_..."',
                                                              repr(env["MLANE_KEY"]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT / "sdk" / "python")},
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [line.split()[0] for line in done.stdout.splitlines()]
    assert printed and all(printed), done.stdout  # the quota loop printed each limit's id
    # the checkout's Stripe session, then the consent that started it (read back)
    sessions = re.findall(r"^(?:https://\S+|cs_\w+)$", done.stdout, re.M)
    assert len(sessions) == 2 and sessions[1].startswith("cs_"), done.stdout
    assert "['user-42', 'user-7']" in done.stdout  # the async block's quotas


HOOK_PRELUDE = '''
from flask import Flask, request
app = Flask(__name__)
SECRET = "whsec_readme"
_seen, shown = set(), []
def seen(event_id):  # the app's own store of delivered ids
    known = event_id in _seen
    _seen.add(event_id)
    return known
def show_paywall(user, data):
    shown.append(user)
'''


def test_the_sdk_readme_webhook_handler_takes_signed_deliveries_once() -> None:
    """The SDK README's Flask handler, with deliveries signed by the server's own signer."""
    import time

    from core.events import sign

    [(where, text)] = [(w, t) for w, t in blocks("python")
                       if w.startswith("sdk/") and "def hook" in t]
    sys.path.insert(0, str(ROOT / "sdk" / "python"))
    scope: dict[str, Any] = {"__name__": "readme_hook"}
    exec(compile(HOOK_PRELUDE + text, where, "exec"), scope)  # noqa: S102 - the README's code
    client = scope["app"].test_client()
    body = b'{"id": "evt_1", "type": "usage.limit_reached", "data": {"user": "user-42"}}'

    def post(data: bytes, signature: str | None) -> int:
        headers = {} if signature is None else {"Meterlane-Signature": signature}
        return int(client.post("/hooks/meterlane", data=data, headers=headers).status_code)

    now = int(time.time())
    assert post(body, sign("whsec_readme", body, now)) == 200
    assert post(body, sign("whsec_readme", body, now)) == 200  # delivered twice, shown once
    assert scope["shown"] == ["user-42"]
    assert post(body.replace(b"user-42", b"user-43"), sign("whsec_readme", body, now)) == 400
    assert post(body, sign("whsec_other", body, now)) == 400
    assert post(body, sign("whsec_readme", body, now - 301)) == 400  # a replay
    assert post(body, None) == 400
    assert scope["shown"] == ["user-42"]


def test_the_example_configs_limit_names_reach_the_quota_in_each_language(
        served: tuple[str, dict[str, str]]) -> None:
    import httpx

    base, env = served
    names = {}
    for lang in ("en", "de", "fr", "es"):
        quota = httpx.get(f"{base}/v1/users/user-42/quota?locale={lang}",
                          headers={"Authorization": f"Bearer {env['MLANE_KEY']}"}).json()
        names[lang] = [limit["name"] for limit in quota["limits"]]
    assert names["de"] == ["Tokens am Tag", "Anfragen pro Minute"]  # the plan's; made up
    assert names["fr"] == ["Jetons du jour", "Requêtes par minute"]
    assert names["en"] == names["es"] == ["Daily tokens", "Requests per minute"]
