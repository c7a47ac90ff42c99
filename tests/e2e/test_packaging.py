"""The distribution as users get it: a wheel built from the checkout installs into a fresh
virtual environment with every data file, and `meterlane serve` runs from an empty folder;
from the checkout's root, Flask's own `flask --app app` finds the application."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DATA_FILES = ("metering/lua/reserve.lua", "metering/lua/settle.lua", "paywall/widget.js",
              "finance/dashboard.html", "migrations/script.py.mako",
              "migrations/versions/0001_initial.py")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLANE_", "PYTHON"))}
    return {**env, **extra}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment holding the wheel of this checkout (its dependencies are
    this environment's, added to its path after the install: nothing is downloaded twice)."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"  # a copy: building writes build/ and *.egg-info beside the code
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
        "node_modules"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(work / "dist"), str(source)], check=True, timeout=300)
    [wheel] = (work / "dist").glob("meterlane-*.whl")
    target = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    python = target / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print("
                                "sysconfig.get_paths()['purelib'])"], capture_output=True,
                               text=True, check=True).stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return target


def test_the_wheel_installs_the_code_and_every_data_file(venv: Path, tmp_path: Path) -> None:
    probe = ("import importlib.resources as r, app, core\n"
             f"for f in {DATA_FILES!r}:\n"
             "    top, _, rest = f.partition('/')\n"
             "    assert r.files(top).joinpath(rest).is_file(), f\n"
             "print(app.__file__)\nprint(core.__file__)")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path,
                          env=_clean_env(), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    for line in done.stdout.split():
        assert Path(line).is_relative_to(venv), line  # the installed copy, not the checkout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("folder", ["empty", "a project of the user's own"])
def test_meterlane_serve_runs_from_any_folder(venv: Path, tmp_path: Path, folder: str) -> None:
    if folder != "empty":  # names the installed code also uses must not shadow it
        (tmp_path / "app.py").write_text("raise SystemExit('the user app.py was imported')\n")
        for package in ("core", "migrations", "gateway"):
            (tmp_path / package).mkdir()
            (tmp_path / package / "__init__.py").write_text("raise SystemExit(3)\n")
    port = _free_port()
    proc = subprocess.Popen([str(venv / "bin" / "meterlane"), "serve", "--port", str(port),
                             "--workers", "1"], cwd=tmp_path, env=_clean_env(),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",  # noqa: S310
                                            timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"serve did not answer: {proc.communicate()[1][-2000:]}")
                time.sleep(0.2)
        # its embedded default: a SQLite file in the folder it was started from
        assert (tmp_path / "var" / "meterlane.db").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_flask_finds_the_app_from_the_checkouts_root(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "routes"], cwd=ROOT,
                          env=_clean_env(MLANE_DATA_DIR=str(tmp_path / "var")),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for route in ("/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/messages",
                  "/healthz"):
        assert route in done.stdout


def test_the_sdk_installs_from_its_own_folder(venv: Path, tmp_path: Path) -> None:
    """sdk/python/README.md's `pip install ./sdk/python`: its own distribution, with every
    module (the sync and the async client), importable away from the checkout."""
    source = tmp_path / "sdk"  # a copy: building writes build/ and *.egg-info beside the code
    shutil.copytree(ROOT / "sdk" / "python", source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", str(source)], check=True, timeout=300)
    probe = ("import meterlane_sdk\n"
             "from meterlane_sdk import AsyncMeterlane, Meterlane, verify\n"
             "assert 'site-packages' in meterlane_sdk.__file__, meterlane_sdk.__file__\n"
             "Meterlane('http://127.0.0.1:9', 'k').close()\n"
             "import asyncio; asyncio.run(AsyncMeterlane('http://127.0.0.1:9', 'k').aclose())\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path,
                          env=_clean_env(), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
