"""The upstream HTTP client (gateway.upstream_http under gateway.upstream.UpstreamClient) against
real servers on loopback, scripted connection by connection: keep-alive connections the server
closed, requests never sent twice, refused connects and timeouts as the domain's errors,
streams relayed as they arrive and closed early, TLS."""

from __future__ import annotations

import datetime
import gzip
import queue
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.config import UpstreamConfig
from core.errors import UpstreamTimeoutError, UpstreamUnavailableError
from gateway.upstream import UpstreamClient
from gateway.upstream_http import ConnectFailedError, HTTPPool

WAIT = 10.0  # a bound for waits that end at once when the code is right
COULD_NOT_OPEN = "Could not connect to upstream 'gpu': could not open a connection."


class Peer:
    """The server's end of one accepted connection."""

    def __init__(self, sock: socket.socket, server: Server, number: int) -> None:
        self.sock, self.server, self.number = sock, server, number
        self.buf = b""

    def request(self) -> bytes | None:
        """The next request's body (recorded on the server), None at the client's close."""
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buf) < length:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        body, self.buf = self.buf[:length], self.buf[length:]
        self.server.heads.append(head)
        self.server.requests.append(body)
        return body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_close(self) -> None:
        """Until the client closes its end."""
        while self.sock.recv(65536):
            pass

    def reset(self) -> None:
        """Close with a reset (SO_LINGER 0), not a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


Script = Callable[[Peer], None]


class Server:
    """Accepts on loopback; each connection runs `script` on its own thread. `ended` gets the
    number of each connection the server closed (after its close)."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script, self.tls = script, tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.heads: list[bytes] = []
        self.ended: queue.Queue[int] = queue.Queue()
        self.release = threading.Event()  # set at the end: scripts that hang stop
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(sock, self.connections),
                             daemon=True).start()

    def _run(self, sock: socket.socket, number: int) -> None:
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            self.script(Peer(sock, self, number))
        except OSError:
            pass
        finally:
            sock.close()
            self.ended.put(number)

    def close(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.fixture()
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(script: Script, tls: ssl.SSLContext | None = None) -> Server:
        servers.append(Server(script, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def client_of(port: int, *, connect: float = 5.0, read: float = WAIT) -> UpstreamClient:
    return UpstreamClient(UpstreamConfig(name="gpu", base_url=f"http://127.0.0.1:{port}/v1",
                                         connect_timeout_s=connect, read_timeout_s=read))


def ok(body: bytes, *extra: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"".join(extra)
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def answer_all(peer: Peer) -> None:
    """Answers every request on the connection, keep-alive, until the client closes."""
    while (body := peer.request()) is not None:
        peer.send(ok(b'{"echo":' + body + b"}"))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


# -- connections the server closed, requests never sent twice ---------------------------------

@pytest.mark.parametrize("how", ["fin", "reset"])
def test_a_keep_alive_connection_the_server_closed_since_is_not_used(
        serve: Callable[..., Server], how: str) -> None:
    answered = threading.Event()

    def script(peer: Peer) -> None:
        if peer.number == 1:  # one answer, kept alive by its headers, then closed
            peer.request()
            peer.send(ok(b"1"))
            assert answered.wait(WAIT)  # (a reset before the client read would lose it)
            if how == "reset":
                peer.reset()
        else:
            answer_all(peer)

    server = serve(script)
    client = client_of(server.port)
    assert client.post("/chat/completions", b"1", stream=False).data == b"1"
    answered.set()
    assert server.ended.get(timeout=WAIT) == 1
    resp = client.post("/chat/completions", b"2", stream=False)
    assert (resp.status, resp.data) == (200, b'{"echo":2}')
    assert server.requests == [b"1", b"2"]  # each sent once
    assert server.connections == 2


def test_a_request_the_server_may_have_read_is_never_sent_again(
        serve: Callable[..., Server]) -> None:
    def script(peer: Peer) -> None:
        if peer.number == 1:
            peer.request()
            peer.send(ok(b"1"))
            peer.request()  # read whole, then the connection closes without an answer
        else:
            answer_all(peer)

    server = serve(script)
    client = client_of(server.port)
    assert client.post("/chat/completions", b"1", stream=False).status == 200
    with pytest.raises(UpstreamUnavailableError) as caught:
        client.post("/chat/completions", b"2", stream=False)
    assert caught.value.detail == "Connection to upstream 'gpu' failed: ProtocolError."
    # The next call takes a new connection; the failed one was not sent again before it.
    assert client.post("/chat/completions", b"3", stream=False).data == b'{"echo":3}'
    assert server.requests == [b"1", b"2", b"3"]
    assert server.connections == 2


def test_a_connection_with_bytes_nobody_asked_for_is_not_reused(
        serve: Callable[..., Server]) -> None:
    def script(peer: Peer) -> None:
        peer.request()
        peer.send(ok(b"1") + b"HTTP/1.1 200 OK\r\n")  # a stray answer after the first
        answer_all(peer)

    server = serve(script)
    client = client_of(server.port)
    assert client.post("/c", b"1", stream=False).data == b"1"
    assert client.post("/c", b"2", stream=False).data == b"1"  # the new connection's first
    assert server.requests == [b"1", b"2"]
    assert server.connections == 2


def test_answers_on_one_connection_reuse_it(serve: Callable[..., Server]) -> None:
    server = serve(answer_all)
    client = client_of(server.port)
    for i in range(5):
        resp = client.post("/chat/completions", str(i).encode(), stream=False)
        assert resp.data == b'{"echo":%d}' % i
    assert server.connections == 1
    assert server.heads[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


# -- connect and read failures as the domain's errors -----------------------------------------

def test_a_refused_connection_is_unavailable_and_says_refused() -> None:
    with socket.socket() as bound:  # bound, not listening: a connect is refused
        bound.bind(("127.0.0.1", 0))
        client = client_of(bound.getsockname()[1])
        with pytest.raises(UpstreamUnavailableError) as caught:
            client.post("/chat/completions", b"{}", stream=False)
    assert caught.value.detail == "Could not connect to upstream 'gpu': connection refused."


def test_a_name_that_does_not_resolve_could_not_open_a_connection() -> None:
    client = UpstreamClient(UpstreamConfig(name="gpu", base_url="http://no-such-host.invalid/v1"))
    with pytest.raises(UpstreamUnavailableError) as caught:
        client.post("/chat/completions", b"{}", stream=False)
    assert caught.value.detail == COULD_NOT_OPEN


def test_a_connect_that_gets_no_answer_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        held: list[socket.socket] = []
        try:
            for _ in range(16):  # fill the accept queue: then SYNs are dropped
                try:
                    held.append(socket.create_connection(address, timeout=0.2))
                except TimeoutError:
                    break
            else:
                pytest.skip("this kernel answered every connect")
            client = client_of(address[1], connect=0.2)
            with pytest.raises(UpstreamTimeoutError) as caught:
                client.post("/chat/completions", b"{}", stream=False)
        finally:
            for sock in held:
                sock.close()
    assert caught.value.detail == "Timed out waiting for upstream 'gpu'."


def test_an_upstream_that_does_not_answer_times_out(serve: Callable[..., Server]) -> None:
    def script(peer: Peer) -> None:
        peer.request()
        peer.server.release.wait()

    server = serve(script)
    with pytest.raises(UpstreamTimeoutError) as caught:
        client_of(server.port, read=0.2).post("/chat/completions", b"{}", stream=False)
    assert caught.value.detail == "Timed out waiting for upstream 'gpu'."


def test_a_stream_that_stalls_times_out_after_what_it_sent(
        serve: Callable[..., Server]) -> None:
    def script(peer: Peer) -> None:
        peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"one"))
        peer.server.release.wait()

    server = serve(script)
    client = client_of(server.port, read=0.2)
    resp = client.post("/chat/completions", b"{}", stream=True)
    got = []
    with pytest.raises(UpstreamTimeoutError):
        for data in client.chunks(resp):
            got.append(data)
    assert got == [b"one"]


def test_an_answer_cut_short_is_unavailable(serve: Callable[..., Server]) -> None:
    def script(peer: Peer) -> None:
        peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    server = serve(script)
    with pytest.raises(UpstreamUnavailableError) as caught:
        client_of(server.port).post("/chat/completions", b"{}", stream=False)
    assert caught.value.detail == "Connection to upstream 'gpu' failed: ProtocolError."


# -- streams ----------------------------------------------------------------------------------

@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_a_stream_is_relayed_as_it_arrives(serve: Callable[..., Server], framing: str) -> None:
    go = threading.Event()  # the client has the first part: only then the second is sent

    def script(peer: Peer) -> None:
        while peer.request() is not None:
            head = {"chunked": b"Transfer-Encoding: chunked\r\n",
                    "length": b"Content-Length: 10\r\n", "close": b""}[framing]
            first, second = (chunk(b"first"), chunk(b"twice") + b"0\r\n\r\n") \
                if framing == "chunked" else (b"first", b"twice")
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + head
                      + b"\r\n" + first)
            assert go.wait(WAIT)
            go.clear()
            peer.send(second)
            if framing == "close":
                return

    server = serve(script)
    client = client_of(server.port)
    for _ in range(2):
        resp = client.post("/chat/completions", b"{}", stream=True)
        got = []
        for data in client.chunks(resp):
            got.append(data)
            if len(got) == 1:
                go.set()
        assert got == [b"first", b"twice"]
        resp.release()
    assert server.connections == (2 if framing == "close" else 1)


def test_a_stream_closed_early_stops_the_upstream_and_its_connection_is_not_reused(
        serve: Callable[..., Server]) -> None:
    def script(peer: Peer) -> None:
        if peer.number == 1:
            peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"a"))
            peer.wait_close()  # returns when the client closed its end
        else:
            answer_all(peer)

    server = serve(script)
    client = client_of(server.port)
    resp = client.post("/chat/completions", b"1", stream=True)
    parts = client.chunks(resp)
    assert next(parts) == b"a"
    resp.release()  # the body was not read to its end: closed, not pooled
    assert server.ended.get(timeout=WAIT) == 1  # the upstream saw the close
    assert client.post("/chat/completions", b"2", stream=False).data == b'{"echo":2}'
    assert server.connections == 2


# -- the answer ------------------------------------------------------------------------------

def test_the_status_headers_and_body_are_read_and_the_connection_reused(
        serve: Callable[..., Server]) -> None:
    def script(peer: Peer) -> None:
        peer.request()
        peer.send(b"HTTP/1.1 100 Continue\r\n\r\n"
                  + b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nX-Request-Id: up-1\r\n"
                  b"Set-Thing: a\r\nset-thing: b\r\nContent-Length: 5\r\n\r\nslow!")
        answer_all(peer)

    server = serve(script)
    client = client_of(server.port)
    resp = client.post("/chat/completions", b"{}", stream=True, request_id="req_1",
                       extra={"traceparent": "00-ab-cd-01", "X-Bad": "a\r\nInjected: 1"})
    assert resp.status == 429
    assert resp.headers.get("retry-after") == "7" and resp.headers["RETRY-AFTER"] == "7"
    assert resp.headers.get("x-request-id") == "up-1" and "X-Request-ID" in resp.headers
    assert resp.headers.get("Set-Thing") == "a, b"
    assert resp.headers.get("absent") is None
    assert resp.data == b"slow!"
    resp.release()
    head = server.heads[0].lower()
    assert b"\r\nx-meterlane-request-id: req_1" in head and b"traceparent: 00-ab-cd-01" in head
    assert b"injected" not in head  # a header that would break the request is left out
    assert client.post("/c", b"2", stream=False).data == b'{"echo":2}'
    assert server.connections == 1  # the error's body was read: the connection was reused


def test_a_head_in_bare_line_feeds_and_a_folded_header(serve: Callable[..., Server]) -> None:
    def script(peer: Peer) -> None:
        peer.request()
        peer.send(b"HTTP/1.0 200 OK\nX-Long: a\n  b\nContent-Length: 2\n\nok")

    server = serve(script)
    client = client_of(server.port)
    resp = client.post("/c", b"{}", stream=False)
    assert (resp.status, resp.headers.get("x-long"), resp.data) == (200, "a b", b"ok")
    assert client.post("/c", b"{}", stream=False).status == 200  # HTTP/1.0: not kept alive
    assert server.connections == 2


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_a_large_body_arrives_whole(serve: Callable[..., Server], framing: str) -> None:
    body = bytes(range(256)) * 12_000  # 3 MB, many reads
    head = {"chunked": b"Transfer-Encoding: chunked\r\n",
            "length": b"Content-Length: %d\r\n" % len(body), "close": b""}[framing]
    sent = chunk(body[:5]) + chunk(body[5:]) + b"0\r\n\r\n" if framing == "chunked" else body

    def script(peer: Peer) -> None:
        while peer.request() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + sent)
            if framing == "close":
                return

    server = serve(script)
    client = client_of(server.port)
    assert client.post("/c", b"{}", stream=False).data == body
    assert b"".join(client.chunks(client.post("/c", b"{}", stream=True))) == body
    assert server.connections == (2 if framing == "close" else 1)


def test_a_gzipped_body_is_decoded(serve: Callable[..., Server]) -> None:
    def script(peer: Peer) -> None:
        peer.request()
        peer.send(ok(gzip.compress(b'{"a":1}'), b"Content-Encoding: gzip\r\n"))

    server = serve(script)
    assert client_of(server.port).post("/c", b"{}", stream=False).data == b'{"a":1}'


def test_a_tls_upstream_keeps_one_connection_and_an_untrusted_certificate_fails(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = serve(answer_all, tls=context)
    trusting = ssl.create_default_context(cafile=str(cert))
    pool = HTTPPool(f"https://localhost:{server.port}/v1", connect_timeout=5,
                    read_timeout=WAIT, ssl_context=trusting)
    for i in range(3):
        assert pool.post("/c", b"", b"%d" % i, preload=True).data == b'{"echo":%d}' % i
    assert server.connections == 1
    pool.close()
    untrusting = HTTPPool(f"https://localhost:{server.port}/v1", connect_timeout=5,
                          read_timeout=WAIT)
    with pytest.raises(ConnectFailedError) as failed:  # the default context does not trust it
        untrusting.post("/c", b"", b"{}", preload=True)
    assert client_of(server.port).translate(failed.value).detail == COULD_NOT_OPEN


def _self_signed(folder: Path) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


# -- work done while the upstream works -------------------------------------------------------

def test_meanwhile_runs_after_the_request_is_sent_and_before_the_answer(
        serve: Callable[..., Server]) -> None:
    went = threading.Event()
    seen: list[bool] = []

    def script(peer: Peer) -> None:
        peer.request()
        seen.append(went.wait(WAIT))  # the answer waits for the client's work
        peer.send(ok(b'{"a":1}'))
        answer_all(peer)

    server = serve(script)
    client = client_of(server.port)
    assert client.post("/c", b"{}", stream=False, meanwhile=went.set).data == b'{"a":1}'
    assert seen == [True]

    def fails() -> None:
        raise RuntimeError("no headers today")

    went.clear()
    assert client.post("/c", b"{}", stream=False, meanwhile=fails).data == b'{"echo":{}}'


def test_meanwhile_is_not_run_for_a_request_that_was_not_sent() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there
    ran: list[int] = []
    with pytest.raises(UpstreamUnavailableError):
        client_of(port).post("/c", b"{}", stream=False, meanwhile=lambda: ran.append(1))
    assert ran == []
