"""`meterlane demo`: the whole product on the embedded default, in a folder of its own.

It writes a demo config (a "local GPU" upstream with an hourly cost, a "cloud" one with list
prices, free / pro / team plans with refreshing limits, a credit pack), starts the model
simulator (gateway/simulator.py: not a model) unless a real server is given, starts
`meterlane serve` on that folder's SQLite database, publishes an offer that passes the rules,
and drives simulated end users through the official `openai` package: streamed and not; the
free plan's daily tokens run out for the heavy ones, who get the 402 with the paywall's offer,
and some of them subscribe (Stripe's events delivered signed, as Stripe would). Then it prints
what happened, as the service itself reports it, and the addresses to look at."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
from jinja2 import Environment, FileSystemLoader, select_autoescape

MARKER = ".meterlane-demo"
EXAMPLES = Path(__file__).parents[1] / "core" / "examples"
TEMPLATES = Path(__file__).with_name("templates")
FREE_TOKENS_PER_DAY = 1500
MESSAGES = [
    "Summarise this support ticket in two sentences.",
    "Draft a polite reply to a customer asking for a refund.",
    "Explain what a token bucket is to a new engineer.",
    "List three risks of shipping on a Friday.",
    "Translate 'your quota resets at midnight' into German.",
    "Write a haiku about GPUs idling at night.",
]

CONFIG = """# The demo's configuration, written by `meterlane demo` (README: Configuration).

[[upstreams]]
name = "local-gpu"                 # {local_note}
base_url = "{local_url}"
cost = {{ hardware_per_hour = "1.20", power_watts = 700, kwh_price = "0.15", \
hosting_per_hour = "0.10", shadow_model = "gpt-4o-mini" }}

[[upstreams]]
name = "cloud"                     # {cloud_note}
base_url = "{cloud_url}"

[[models]]
name = "llama-local"
upstream = "local-gpu"
upstream_model = "{local_model}"
tokenizer = "o200k_base"
level = 1

[[models]]
name = "gpt-4o-mini"
upstream = "cloud"
upstream_model = "{cloud_model}"
price = {{ input = "0.15", cached_input = "0.075", output = "0.60" }}

[[models]]
name = "o3-mini"
upstream = "cloud"
upstream_model = "{cloud_model}"
price = {{ input = "1.10", cached_input = "0.55", output = "4.40" }}
tier = "frontier"
level = 3

[[plans]]
id = "free"
name = "Free"
default = true
tiers = ["standard"]
[[plans.limits]]
metric = "tokens"
window = "day"
amount = {free_tokens}
[[plans.limits]]
metric = "requests"
window = "minute"
amount = 60

[[plans]]
id = "pro"
name = "Pro"
price = {{ amount = 2000, currency = "usd", interval = "month" }}
trial_days = 14
tiers = ["standard", "frontier"]
allowance = 1000000
credit_multipliers = {{ frontier = 5 }}
[[plans.limits]]
metric = "concurrent"
amount = 4

[[plans]]
id = "team"
name = "Team"
price = {{ amount = 19200, currency = "usd", interval = "year" }}
tiers = ["standard", "frontier"]
allowance = 5000000

[[credit_packs]]
id = "100k"
credits = 100000
price = {{ amount = 500, currency = "usd" }}
"""


@dataclass
class Tally:
    """What the simulated end users saw."""

    calls: int = 0
    streamed: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    offers_seen: set[str] = field(default_factory=set)
    out_of_quota: list[str] = field(default_factory=list)
    subscribed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class DemoError(Exception):
    """The demo cannot run: the message says why and what to do."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_folder(folder: Path) -> None:
    """The demo's own folder: made, or emptied when an earlier demo made it; never a folder
    of the user's (it must be empty or carry the demo's marker)."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).is_file():
            raise DemoError(f"{folder} holds files that are not the demo's: give --dir a new "
                            "or empty folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("made by meterlane demo; removed by its next run\n")


def demo_env(folder: Path, config: Path, secret: str) -> dict[str, str]:
    """The service's environment: the demo folder's own SQLite database, whatever MLANE_*
    the shell has (never the user's database)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLANE_")}
    env.update(MLANE_DATA_DIR=str(folder / "data"), MLANE_CONFIG=str(config),
               MLANE_STRIPE_WEBHOOK_SECRET=secret)
    return env


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "app", *args], env=env,  # noqa: S603
                          capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise DemoError(f"meterlane {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"meterlane serve stopped: {log.read_text()[-2000:]}")
        try:
            status, _ = request(base, "GET", "/healthz")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)  # waiting for the server to start
    raise DemoError(f"meterlane serve did not answer in 60 s (see {log})")


def request(base: str, method: str, path: str, body: Any = None, *, key: str | None = None,
            raw: bytes | None = None, headers: dict[str, str] | None = None
            ) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=60)
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key:
        sent["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=data, headers=sent)
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, orjson.loads(payload) if payload else None
    except orjson.JSONDecodeError:
        return resp.status, payload.decode(errors="replace")


@contextmanager
def serving(env: dict[str, str], folder: Path, port: int) -> Iterator[str]:
    log = folder / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "serve",  # noqa: S603
                                 "--port", str(port),
                                 "--workers", "2"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base, log)
        yield base
    finally:
        proc.send_signal(2)  # SIGINT: gunicorn's quick shutdown
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Demo:
    def __init__(self, folder: Path, *, port: int, users: int, upstream: str | None,
                 model: str | None, echo: Callable[[str], None], seed: int = 7) -> None:
        self.folder, self.port, self.users = folder, port, users
        self.upstream, self.model, self.echo = upstream, model, echo
        self.rnd = random.Random(seed)  # noqa: S311 - a demo's choices, reproducible
        self.secret = "whsec_demo_" + secrets.token_hex(12)
        self.tally = Tally()
        self.base = ""
        self.app_key = self.finance_key = ""
        self.spent: str | None = None  # a user whose quota is spent (their widget shows offers)

    # -- set-up -------------------------------------------------------------------------

    def write_config(self, sim_url: str | None) -> Path:
        if self.upstream is not None:
            model = self.model or _first_model(self.upstream)
            local = cloud = self.upstream.rstrip("/")
            note = "your model server (--upstream)"
            values = {"local_url": local, "cloud_url": cloud, "local_model": model,
                      "cloud_model": model, "local_note": note, "cloud_note": note}
        else:
            assert sim_url is not None
            note = "the simulator (gateway/simulator.py): not a model"
            values = {"local_url": sim_url, "cloud_url": sim_url,
                      "local_model": "llama-3.1-8b-instruct", "cloud_model": "gpt-4o-mini",
                      "local_note": note, "cloud_note": note}
        path = self.folder / "meterlane.toml"
        path.write_text(CONFIG.format(free_tokens=FREE_TOKENS_PER_DAY, **values))
        return path

    def publish_offer(self) -> str:
        offer = orjson.loads((EXAMPLES / "offer.json").read_bytes())
        status, made = request(self.base, "POST", "/v1/paywall/offers", offer, key=self.app_key)
        if status != 201:
            raise DemoError(f"the demo's offer was refused: {made}")
        status, done = request(self.base, "POST", f"/v1/paywall/offers/{offer['offer']}/"
                               f"versions/{made['version']}/publish", key=self.app_key)
        if status != 200:
            raise DemoError(f"the demo's offer did not publish: {done}")
        return str(offer["offer"])

    # -- the simulated end users --------------------------------------------------------

    def run_users(self) -> None:
        import openai

        client = openai.OpenAI(base_url=self.base + "/v1", api_key=self.app_key,
                               max_retries=0, timeout=120)
        plans = [(f"user-{n:03d}", self.rnd.choice([3, 4, 6, 10, 14])) for n in
                 range(self.users)]
        calls = [(user, i) for user, count in plans for i in range(count)]
        self.rnd.shuffle(calls)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda c: self.one_call(client, *c), calls))
        # Some who ran out subscribe (as the offer's checkout would end), then go on.
        payers = sorted(set(self.tally.out_of_quota))[: max(1, len(set(
            self.tally.out_of_quota)) // 2)] if self.tally.out_of_quota else []
        for user in payers:
            self.subscribe(user)
        more = [(user, 100 + i) for user in payers for i in range(4)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda c: self.one_call(client, *c), more))
        # One who did not subscribe goes on until nothing is left: their widget shows the
        # offer (the others' leases were refused while their own calls were in flight).
        spent = sorted(set(self.tally.out_of_quota) - set(payers))
        if spent:
            self.spent = spent[0]
            for i in range(200, 240):
                refused = self.tally.refused["quota_exceeded"]
                self.one_call(client, self.spent, i)
                if self.tally.refused["quota_exceeded"] > refused and self.remaining(
                        self.spent) == 0:
                    break
        client.close()

    def remaining(self, user: str) -> int | None:
        status, quota = request(self.base, "GET", f"/v1/users/{quote(user)}/quota",
                                key=self.app_key)
        if status != 200:
            return None
        left = [limit.get("remaining") for limit in quota.get("limits", [])
                if limit.get("metric") == "tokens"]
        return min((v for v in left if isinstance(v, int)), default=None)

    def one_call(self, client: Any, user: str, n: int) -> None:
        import openai

        rnd = random.Random(f"{user}-{n}")  # noqa: S311 - the call's own choices
        model = rnd.choices(["llama-local", "gpt-4o-mini", "o3-mini"], [6, 4, 1])[0]
        if model == "o3-mini" and user not in self.tally.subscribed:
            model = "gpt-4o-mini"  # the free plan has no frontier tier
        stream = rnd.random() < 0.4
        messages = [{"role": "user", "content": rnd.choice(MESSAGES)}]
        try:
            if stream:
                for _ in client.chat.completions.create(
                        model=model, messages=messages, user=user, stream=True,
                        stream_options={"include_usage": True}):
                    pass
            else:
                client.chat.completions.create(model=model, messages=messages, user=user)
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            err = body.get("error", body) if isinstance(body, dict) else {}
            code = str(err.get("code") or exc.status_code)
            with self.tally.lock:
                self.tally.refused[code] += 1
                if exc.status_code == 402:
                    self.tally.out_of_quota.append(user)
                    for offer in (err.get("paywall") or {}).get("offers") or []:
                        self.tally.offers_seen.add(str(offer.get("offer")))
            return
        with self.tally.lock:
            self.tally.calls += 1
            self.tally.streamed += stream

    def subscribe(self, user: str) -> None:
        """What Stripe sends when the user's checkout of the offer completes: the
        subscription and its first invoice, signed with the demo's webhook secret."""
        app_id, user_id = self.ids(user)
        now = int(time.time())
        owner = {"mlane_app_id": str(app_id), "mlane_end_user_id": str(user_id),
                 "mlane_plan": "pro@1"}
        sub = {"id": f"sub_demo_{user}", "object": "subscription", "status": "active",
               "customer": f"cus_demo_{user}", "metadata": owner,
               "billing_cycle_anchor": now, "cancel_at_period_end": False, "trial_end": None,
               "items": {"object": "list", "data": [{
                   "id": f"si_demo_{user}", "current_period_start": now,
                   "current_period_end": now + 30 * 86400,
                   "price": {"id": "price_demo_pro", "lookup_key": "pro@1"}}]}}
        invoice = {"id": f"in_demo_{user}", "object": "invoice", "amount_paid": 2000,
                   "currency": "usd", "customer": f"cus_demo_{user}", "metadata": owner,
                   "subscription_details": {"metadata": owner},
                   "lines": {"data": [{"period": {"start": now, "end": now + 30 * 86400}}]}}
        for kind, obj in (("customer.subscription.created", sub), ("invoice.paid", invoice)):
            payload = orjson.dumps({"id": f"evt_demo_{kind}_{user}", "object": "event",
                                    "type": kind, "created": now, "data": {"object": obj}})
            status, body = request(self.base, "POST", "/v1/stripe/webhook", raw=payload,
                                   headers=_stripe_signature(payload, self.secret))
            if status != 200:
                raise DemoError(f"the simulated Stripe event {kind} was refused: {body}")
        with self.tally.lock:
            self.tally.subscribed.append(user)

    def ids(self, user: str) -> tuple[int, int]:
        """(app id, end user id) from the demo's own database."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.folder / 'data' / 'meterlane.db'}?mode=ro", uri=True)
        try:
            found = db.execute("SELECT e.app_id, e.id FROM end_users e JOIN apps a ON "
                               "a.id = e.app_id WHERE a.name = 'demo' AND e.external_id = ?",
                               (user,)).fetchone()
        finally:
            db.close()
        if found is None:
            raise DemoError(f"end user {user} is not in the demo's database")
        return int(found[0]), int(found[1])

    # -- the report -----------------------------------------------------------------------

    def report(self, app_url: str) -> list[str]:
        period = datetime.now(UTC).strftime("%Y-%m")
        _, usage = request(self.base, "GET", "/v1/usage?group_by=model", key=self.app_key)
        _, summary = request(self.base, "GET", f"/v1/finance/summary?period={period}",
                             key=self.finance_key)
        t = self.tally
        refused = ", ".join(f"{n} {code}" for code, n in sorted(t.refused.items())) or "none"
        lines = [
            "",
            f"Meterlane demo: {self.users} simulated end users, {t.calls} calls answered "
            f"({t.streamed} streamed), refused: {refused}",
            f"  {len(set(t.out_of_quota))} ran out of the free plan's {FREE_TOKENS_PER_DAY:,} "
            f"tokens a day and were offered {', '.join(sorted(t.offers_seen)) or 'nothing'}; "
            f"{len(t.subscribed)} subscribed to Pro",
            "",
            f"  {'model':<14}{'calls':>7}{'tokens in':>12}{'tokens out':>12}"
            f"{'cost at call USD':>18}",
        ]
        for group in usage.get("groups", []) if isinstance(usage, dict) else []:
            cost = Decimal(group["cost_usd"]).quantize(Decimal("0.000001"))
            shown = f"{cost}" if group["key"] != "llama-local" else "by the GPU hour"
            lines.append(f"  {group['key']:<14}{group['requests']:>7,}"
                         f"{group['input_tokens']:>12,}{group['output_tokens']:>12,}"
                         f"{shown:>18}")
        lines.append("  (calls include the refused ones: every call has its ledger row)")
        if isinstance(summary, dict) and "revenue_usd" in summary:
            lines += ["", f"  finance, {period} so far (as /v1/finance/summary reports it):"]
            for label, name in (("revenue", "revenue_usd"),
                                ("inference cost", "inference_cost_usd"),
                                ("  cloud", "cloud_cost_usd"),
                                ("  local GPU", "local_cost_usd"),
                                ("gross margin", "gross_margin_usd"),
                                ("cost per active user", "cost_per_active_user_usd")):
                lines.append(f"    {label:<22}{_usd(summary.get(name)):>12}")
            lines.append(f"    {'gross margin %':<22}"
                         f"{_percent(summary.get('gross_margin_percent')):>12}")
            lines.append(f"    {'active users':<22}{summary.get('active_users_monthly', 0):>12,}")
        lines += [
            "",
            f"  finance dashboard  {self.base}/finance#key={self.finance_key}&period={period}",
            f"  demo app (widget)  {app_url}",
            f"  API document       {self.base}/openapi.json",
            f"  the service        {self.base}/   (app key {self.app_key})",
            f"  data and logs      {self.folder}",
        ]
        return lines


def _usd(value: Any) -> str:
    """Exact decimal USD, shown to the cent (JSON keeps the exact value)."""
    if value is None:
        return "-"
    return f"{Decimal(str(value)).quantize(Decimal('0.01')):,} USD"


def _percent(value: Any) -> str:
    return "-" if value is None else f"{Decimal(str(value)).quantize(Decimal('0.1'))} %"


def _stripe_signature(payload: bytes, secret: str) -> dict[str, str]:
    """Stripe's scheme: HMAC-SHA256 of "timestamp.payload" with the endpoint's secret."""
    at = str(int(time.time()))
    sig = hmac.new(secret.encode(), f"{at}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={at},v1={sig}"}


def _first_model(upstream: str) -> str:
    """The first model a real OpenAI-compatible server lists (vLLM, Ollama, llama.cpp)."""
    from urllib.parse import urlsplit

    parts = urlsplit(upstream.rstrip("/") + "/models")
    conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    try:
        conn.request("GET", parts.path)
        body = orjson.loads(conn.getresponse().read())
        return str(body["data"][0]["id"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise DemoError(f"{upstream}/models lists no model ({exc}); name one with "
                        "--model") from exc
    finally:
        conn.close()


class DemoApp:
    """The demo app's page: what an app shows its users, the quota widget with a short-lived
    end-user key minted by the app's back end (here) for each page view."""

    def __init__(self, demo: Demo) -> None:
        env = Environment(loader=FileSystemLoader(TEMPLATES),
                          autoescape=select_autoescape(["html"]))
        template = env.get_template("demo_app.html")

        def users() -> list[str]:  # one who subscribed, one out of quota, one with quota left
            fine = sorted({f"user-{n:03d}" for n in range(demo.users)}
                          - set(demo.tally.out_of_quota))
            return demo.tally.subscribed[:1] + ([demo.spent] if demo.spent else []) + fine[:1]

        class Page(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] != "/":
                    self.send_error(404)
                    return
                locale = (self.path.partition("locale=")[2] or "en")[:5]
                widgets = []
                for user in dict.fromkeys(users()):
                    status, minted = request(demo.base, "POST",
                                             f"/v1/users/{quote(user)}/keys", {},
                                             key=demo.app_key)
                    if status == 201:
                        widgets.append({"user": user, "key": minted["key"]})
                html = template.render(base=demo.base, widgets=widgets, locale=locale,
                                       jurisdiction="DE" if locale == "de" else "US-CA")
                data = html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run(folder: Path, *, once: bool, port: int | None, users: int, upstream: str | None,
        model: str | None, echo: Callable[[str], None]) -> None:
    from gateway.simulator import Simulator

    started = time.monotonic()
    folder = folder.absolute()
    prepare_folder(folder)

    def interrupted(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the demo as Ctrl-C does: its server too

    signal.signal(signal.SIGTERM, interrupted)
    demo = Demo(folder, port=port or free_port(), users=users, upstream=upstream, model=model,
                echo=echo)
    with ExitStack() as stack:
        sim_url = None
        if upstream is None:
            sim = stack.enter_context(Simulator())
            sim_url = sim.base_url
            echo(f"demo: the model simulator answers on {sim_url} (simulated text, real "
                 "token counts; not a model)")
        config = demo.write_config(sim_url)
        env = demo_env(folder, config, demo.secret)
        demo.app_key = _cli(env, "keys", "create", "--role", "app", "--app", "demo",
                            "--name", "demo app").split()[-1]
        demo.finance_key = _cli(env, "keys", "create", "--role", "finance", "--app", "demo",
                                "--name", "demo finance").split()[-1]
        demo.base = stack.enter_context(serving(env, folder, demo.port))
        echo(f"demo: meterlane serves {demo.base} from {folder} (its own SQLite database)")
        offer = demo.publish_offer()
        echo(f"demo: offer {offer!r} published; {users} end users start calling")
        demo.run_users()
        page = DemoApp(demo)
        stack.callback(page.close)
        for line in demo.report(page.url):
            echo(line)
        echo(f"\ndemo: done in {time.monotonic() - started:.0f} s")
        if once:
            return
        echo("demo: serving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            echo("demo: stopped")
