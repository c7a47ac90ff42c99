"""Text that crosses into Meterlane: what may be stored (no NUL or control characters, a
length cap), how free text from outside is made storable, and how secrets and internal
addresses are kept out of what a tenant reads or the ledger keeps."""

from __future__ import annotations

import re

# C0 controls but tab, newline and carriage return; DEL; C1 controls. Postgres refuses NUL
# outright; the rest break logs, CSV exports and terminals.
# Lone UTF-16 surrogates too: no database or encoder takes them.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_ANY = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Things in an upstream's words that are the operator's, not the tenant's: bearer tokens and
# API keys (sk-..., mlk_..., key=...), and URLs (internal hosts, query strings with secrets).
_SECRET = re.compile(
    r"(?i)(bearer\s+[\w.~+/=-]{6,}|\b(?:sk|pk|rk|mlk|key|api[_-]?key|token|secret)"
    r"[-_:=]+[\w.~+/-]{6,}|\b(?!req_)[A-Za-z0-9_-]{32,}\b)")
_URL = re.compile(r"(?i)\b(?:https?|wss?|ftp)://\S+")
_HOSTPORT = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b|\blocalhost(?::\d+)?\b")


def control_free(text: str, *, multiline: bool = True) -> bool:
    """True when the text holds no NUL or control character (tab and newlines allowed when
    `multiline`)."""
    if text.isascii() and text.isprintable():  # the common case, in C
        return True
    return (_CONTROL if multiline else _CONTROL_ANY).search(text) is None


def storable(text: str, cap: int) -> str:
    """Free text from outside (an upstream's error, a reason) made safe to store: control
    characters become spaces, lone surrogates are replaced, and it is cut to `cap`."""
    text = _CONTROL_ANY.sub(" ", text)
    return text if len(text) <= cap else text[: cap - 1] + "…"


def redacted(text: str) -> str:
    """The text without anything that looks like a key, a token or an address."""
    text = _URL.sub("[url]", text)
    text = _SECRET.sub("[redacted]", text)
    return _HOSTPORT.sub("[host]", text)
