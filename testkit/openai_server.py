"""A scripted OpenAI-compatible HTTP server on 127.0.0.1, for tests.

It serves ``POST /v1/chat/completions`` and ``GET /v1/models`` from a thread
(stdlib ``http.server``) on a free loopback port. Tests script what it does,
request by request: reply with a text, fail with a status (optionally with a
``retry-after-ms`` header so the client's backoff stays short, or a
``Retry-After``), send a body that is not JSON (any status, headers, with or
without a Content-Length), hang past the client's timeout, trickle an answer
one byte at a time, or reset the connection. Every behaviour is bounded in
time, so a test can never hang on the server. It records every request
(path, headers, JSON body) and the most requests it ever had in flight, so
tests can assert on prompts, model names, retries and concurrency.

    with ScriptedServer() as srv:
        srv.script(Status(429), Status(429), Reply('["red circles"]'))
        ... OpenAISummarizer(model="m", base_url=srv.base_url) ...
        assert len(srv.chat_requests) == 3
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Reply:
    """Answer 200 with a chat completion whose message content is ``text``."""

    text: str
    prompt_tokens: int = 11
    completion_tokens: int = 7
    delay: float = 0.0


@dataclass(frozen=True)
class Status:
    """Answer with an HTTP error status and an OpenAI-style error body;
    ``retry_after`` is sent as the ``Retry-After`` header when set."""

    code: int
    message: str = "scripted error"
    retry_after_ms: int | None = 5
    retry_after: str | None = None


@dataclass(frozen=True)
class RawBody:
    """Answer ``code`` with a body that is not a chat completion (e.g. not
    JSON), extra ``headers``, and no Content-Length when ``content_length``
    is false (the body then ends when the connection closes)."""

    body: bytes = b"<html>certainly not json"
    content_type: str = "text/html"
    code: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    content_length: bool = True


@dataclass(frozen=True)
class Hang:
    """Send nothing for ``seconds`` (past the client's timeout), then close."""

    seconds: float = 5.0


@dataclass(frozen=True)
class Drip:
    """Answer 200 with a chat completion of ``text`` whose headers go at once
    and whose body goes one byte every ``interval`` seconds (each byte comes
    well within a read timeout), for at most ``max_seconds``, then close."""

    text: str = '["red circles"]'
    interval: float = 1.0
    max_seconds: float = 20.0


@dataclass(frozen=True)
class Reset:
    """Read the request, then reset the connection (TCP RST) without answering."""


Behaviour = Reply | Status | RawBody | Hang | Drip | Reset


@dataclass
class Recorded:
    """One request the server got."""

    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any
    started: float
    ended: float = 0.0

    @property
    def messages(self) -> list[dict[str, Any]]:
        return (self.body or {}).get("messages", [])

    def text(self) -> str:
        """All message texts of the request, joined (text parts of
        multi-part contents included)."""
        out = []
        for m in self.messages:
            c = m.get("content")
            if isinstance(c, str):
                out.append(c)
            elif isinstance(c, list):
                out.extend(p.get("text", "") for p in c if isinstance(p, dict))
        return "\n".join(out)


class _Server(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a client opening more
    # connections at once than the accept loop takes (many neurons
    # concurrently, on a busy machine) gets some of them reset, which a test
    # would read as the scripted server's doing
    request_queue_size = 128


class ScriptedServer:
    """The server; use as a context manager. ``script(*behaviours)`` queues
    behaviours for the next chat requests in arrival order; when the queue is
    empty, ``responder(request)`` (if set) or ``default`` decides."""

    def __init__(
        self, default: Behaviour | None = None, models: tuple[str, ...] = ("stub-model",)
    ) -> None:
        self.default: Behaviour = default or Reply('["scripted concept"]')
        self.responder: Callable[[Recorded], Behaviour] | None = None
        self.models = models
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._queue: list[Behaviour] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- scripting -------------------------------------------------------------------
    def script(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self._queue.extend(behaviours)

    @property
    def chat_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._queue.clear()
            self.max_in_flight = 0

    def _next(self, rec: Recorded) -> Behaviour:
        with self._lock:
            if self._queue:
                return self._queue.pop(0)
        if self.responder is not None:
            return self.responder(rec)
        return self.default

    # -- lifecycle -------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def start(self) -> ScriptedServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = _Server((HOST, 0), Handler)  # port 0: a free port
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="scripted-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedServer:  # noqa: PYI034  (no typing.Self on 3.10)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def chat_completion(
    text: str, model: str, prompt_tokens: int = 11, completion_tokens: int = 7
) -> dict[str, Any]:
    """A minimal, valid chat.completion object."""
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class _Handler(BaseHTTPRequestHandler):
    owner: ScriptedServer
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes; with Nagle on, the
    # client's delayed ACK adds ~40 ms to every request on loopback
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        content_length: bool = True,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        if content_length:
            self.send_header("Content-Length", str(len(body)))
        else:  # the body ends when the connection closes
            self.send_header("Connection", "close")
            self.close_connection = True
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj).encode(), headers=headers)

    def do_GET(self) -> None:
        srv = self.owner
        with srv._lock:
            srv.requests.append(
                Recorded("GET", self.path, _lower(self.headers), None, time.monotonic())
            )
        if self.path.rstrip("/") == "/v1/models":
            self._json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "tests"}
                        for m in srv.models
                    ],
                },
            )
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        srv = self.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = raw.decode("utf-8", "replace")
        rec = Recorded("POST", self.path, _lower(self.headers), body, time.monotonic())
        with srv._lock:
            srv.requests.append(rec)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        with srv._lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            self._behave(srv._next(rec), rec)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client gave up (timeout, a cap) or Reset closed the socket: expected
        finally:
            rec.ended = time.monotonic()
            with srv._lock:
                srv.in_flight -= 1

    def _behave(self, b: Behaviour, rec: Recorded) -> None:
        model = rec.body.get("model", "") if isinstance(rec.body, dict) else ""
        if isinstance(b, Reply):
            if b.delay:
                self.owner._stopping.wait(b.delay)
            self._json(200, chat_completion(b.text, model, b.prompt_tokens, b.completion_tokens))
        elif isinstance(b, Status):
            headers = {} if b.retry_after_ms is None else {"retry-after-ms": str(b.retry_after_ms)}
            if b.retry_after is not None:
                headers["Retry-After"] = b.retry_after
            err = {"error": {"message": b.message, "type": "scripted", "code": str(b.code)}}
            self._json(b.code, err, headers)
        elif isinstance(b, RawBody):
            self._send(b.code, b.body, b.content_type, dict(b.headers), b.content_length)
        elif isinstance(b, Hang):
            self.owner._stopping.wait(b.seconds)
            self.close_connection = True
        elif isinstance(b, Drip):
            self._drip(b, json.dumps(chat_completion(b.text, model)).encode())
        elif isinstance(b, Reset):
            # SO_LINGER on with a zero timeout: close() sends RST instead of FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        else:  # pragma: no cover - a test scripted something unknown
            raise TypeError(f"unknown behaviour {b!r}")

    def _drip(self, b: Drip, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        end = time.monotonic() + b.max_seconds
        for i in range(len(body)):  # bounded by the body's length and by max_seconds
            if time.monotonic() >= end or self.owner._stopping.wait(b.interval):
                break
            self.wfile.write(body[i : i + 1])
        self.close_connection = True


def _lower(headers: Any) -> dict[str, str]:
    """Header names in lower case (HTTP names are case-insensitive)."""
    return {k.lower(): v for k, v in headers.items()}
