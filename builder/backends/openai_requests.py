"""One chat completion over the ``openai`` client, under a total deadline.

The client's own retries are switched off (``max_retries=0``): this module
retries, so that it can keep three promises the client cannot.

- **A deadline, not only a read timeout.** ``timeout`` is the most seconds
  one request may take, every attempt and every wait between attempts
  included. Each attempt runs under ``asyncio.wait_for`` with what is left
  of the budget (or ``attempt_timeout``, when that is shorter), so a server
  that trickles one byte per second cannot keep a request open past it.
- **Truthful reasons.** A failure says what happened: the status and the
  server's message, how many retries were actually sent, a Retry-After the
  deadline could not honour, the content type and a short, printable excerpt
  of a body that is not a chat completion.
- **Bounded answers.** The body is read through a capped stream (a
  Content-Length over the cap is refused before reading), compressed bodies
  are refused (identity is asked for), and the answer text is length-checked
  before anyone parses or caches it.

Retried: 408, 409, 429 and 5xx statuses, connection errors (refused, reset,
closed early) and attempts cut by ``attempt_timeout``. Waits follow the
server's ``retry-after-ms`` / ``Retry-After`` when given, else exponential
backoff with jitter; a wait that would end past the deadline is not taken.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from builder.errors import BackendError

RETRIED_STATUS = frozenset({408, 409, 429})
# backoff without Retry-After: BACKOFF_BASE_S * 2**retry, at most BACKOFF_MAX_S, minus up to 25 % jitter
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0
# a chat completion's JSON envelope around its content: ids, usage, finish reason, logprobs
BODY_OVERHEAD_BYTES = 1 << 20
# JSON may escape one character as \uXXXX\uXXXX (a surrogate pair): 12 bytes
BYTES_PER_CHAR = 12
EXCERPT_CHARS = 60


class LLMRequestError(BackendError):
    """A chat request that failed for good; the message is the one-line reason."""


@dataclass(frozen=True)
class Answer:
    """A chat completion that passed the checks: its text and token usage."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Limits:
    """How one request may spend time and bytes.

    ``timeout``: seconds for the whole request (attempts and waits);
    ``attempt_timeout``: seconds per attempt (None: what is left of
    ``timeout``); ``max_retries``: retries after the first attempt;
    ``max_answer_chars``: the longest answer text accepted, an option the
    user knows as ``chars_option``."""

    timeout: float
    max_retries: int
    max_answer_chars: int
    attempt_timeout: float | None = None
    chars_option: str = "max_answer_chars"

    def __post_init__(self) -> None:
        seconds = [self.timeout] + ([] if self.attempt_timeout is None else [self.attempt_timeout])
        ok = all(math.isfinite(x) and x > 0 for x in seconds)
        if not ok or self.max_retries < 0 or self.max_answer_chars < 1:
            raise BackendError(
                "timeout and attempt_timeout must be > 0 seconds, "
                f"max_retries >= 0 and {self.chars_option} >= 1"
            )

    @property
    def max_body_bytes(self) -> int:
        """The most bytes read of one response body."""
        return BODY_OVERHEAD_BYTES + BYTES_PER_CHAR * self.max_answer_chars


@dataclass(frozen=True)
class _Failure:
    """Why one attempt failed: ``what`` (a phrase), whether to retry it, and
    the wait the server asked for."""

    what: str
    retryable: bool
    retry_after: float | None = None
    detail: str = ""  # said after the retry count: the server's message


class _BodyTooLarge(Exception):
    """Raised from the capped stream: the body passed the cap."""


class _NotACompletion(Exception):
    """A 2xx body that is not a chat completion (the message says how)."""


class _AnswerTooLong(Exception):
    """A chat completion whose text is over ``max_answer_chars``."""


# --------------------------------------------------------------------------- excerpts
def excerpt(data: bytes | str, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable, one-line excerpt of untrusted text (``repr``-quoted):
    control and non-printable characters become spaces."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    text = text[: limit * 4]
    one = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return repr(one if len(one) <= limit else one[: limit - 3] + "...")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word[:-1] + 'ies' if word.endswith('y') else word + 's'}"


# --------------------------------------------------------------------------- the capped body
@functools.lru_cache(maxsize=4)
def _capped_stream_class(base: type) -> type:
    """A byte stream (subclass of the HTTP library's own ``AsyncByteStream``,
    which the library checks for) that raises once more than ``limit``
    bytes came."""

    class Capped(base):  # type: ignore[misc, valid-type]
        def __init__(self, inner: Any, limit: int, status: int) -> None:
            self.inner, self.limit, self.status = inner, limit, status

        async def __aiter__(self):  # type: ignore[override]
            seen = 0
            async for chunk in self.inner:
                seen += len(chunk)
                if seen > self.limit:
                    raise _BodyTooLarge(
                        f"HTTP {self.status} body passed the {self.limit:,}-byte limit; reading stopped"
                    )
                yield chunk

        async def aclose(self) -> None:
            await self.inner.aclose()

    return Capped


def body_cap_hook(limit: int) -> Callable[[Any], Any]:
    """An httpx response hook: refuse a Content-Length over ``limit`` or a
    compressed body, and read the rest through a stream capped at ``limit``."""

    async def hook(response: Any) -> None:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _BodyTooLarge(
                f"HTTP {response.status_code} body is compressed (Content-Encoding "
                f"{excerpt(encoding, 20)}) though identity was asked for; not read"
            )
        length = response.headers.get("content-length", "")
        if length.strip().isdigit() and int(length) > limit:
            raise _BodyTooLarge(
                f"HTTP {response.status_code} body of {int(length):,} bytes (Content-Length) is over "
                f"the {limit:,}-byte limit; not read"
            )
        lib = sys.modules[type(response).__module__.partition(".")[0]]  # httpx2 or httpx
        capped = _capped_stream_class(lib.AsyncByteStream)
        response.stream = capped(response.stream, limit, response.status_code)

    return hook


# --------------------------------------------------------------------------- answers
def completion_answer(status: int, content_type: str, body: bytes, max_chars: int,
                      chars_option: str = "max_answer_chars") -> Answer:
    """The text and usage of a chat completion body; raises ``_NotACompletion``
    for anything else and ``_AnswerTooLong`` over ``max_chars``."""
    shown = (f"content type {excerpt(content_type or 'none', 40)}, {len(body):,} bytes, "
             f"starting {excerpt(body)}")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise _NotACompletion(f"HTTP {status} body is not JSON ({shown})") from None
    try:
        content = value["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = False
    if content is None:  # a refusal or a tool call: no text
        content = ""
    if not isinstance(content, str):
        raise _NotACompletion(
            f"HTTP {status} JSON body is not a chat completion: no choices[0].message.content ({shown})"
        )
    if len(content) > max_chars:
        raise _AnswerTooLong(f"the answer is {len(content):,} characters, over the {max_chars:,} limit "
                             f"({chars_option}); not parsed")
    usage = value.get("usage") if isinstance(value.get("usage"), dict) else {}
    return Answer(content, _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")))


def _int(x: Any) -> int:
    return int(x) if isinstance(x, int | float) and math.isfinite(x) and x >= 0 else 0


# --------------------------------------------------------------------------- failures
def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked to wait: ``retry-after-ms``, ``Retry-After``
    in seconds or as an HTTP date; None when absent or unreadable."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = (headers.get(name) or "").strip()
        try:
            value = float(raw) / scale
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            return value
    date = (headers.get("retry-after") or "").strip()
    parsed = email.utils.parsedate_tz(date) if date else None
    return None if parsed is None else max(0.0, email.utils.mktime_tz(parsed) - time.time())


def _server_message(exc: Any) -> str:
    """The server's own error message when its body has one (OpenAI, vLLM and
    Ollama send ``{"error": {"message": ...}}``), else its body's start."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(inner, str):
            return inner
    if isinstance(body, str):
        return body
    return str(getattr(exc, "message", exc))


def _deepest_message(exc: BaseException) -> BaseException:
    """The innermost exception of ``exc``'s chain that has a message (HTTP
    libraries wrap ``ConnectionResetError: [Errno 104] ...`` in errors with
    none); ``exc`` itself when none has. The chain follows ``__cause__``, and
    ``__context__`` only where the wrapper suppressed it (``raise X from
    None`` around the real error): an implicit context is an earlier, other
    exception the failure happened while handling (a reset socket raised
    while the event loop probe's "no running event loop" was being handled)
    and says nothing about this failure."""
    best, seen, found = exc, exc, set()
    while seen is not None and id(seen) not in found:
        found.add(id(seen))
        if str(seen).strip():
            best = seen
        seen = seen.__cause__ or (seen.__context__ if seen.__suppress_context__ else None)
    return best


def classify(exc: BaseException, attempt_s: float) -> _Failure:
    """What one failed attempt means: a phrase, and whether it is worth a retry."""
    import openai

    if isinstance(exc, asyncio.TimeoutError | openai.APITimeoutError):
        return _Failure(f"no complete answer within {attempt_s:.3g} s", True)
    if isinstance(exc, _BodyTooLarge | _NotACompletion | _AnswerTooLong):
        return _Failure(str(exc), False)
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        headers = getattr(getattr(exc, "response", None), "headers", None)
        return _Failure(f"HTTP {code}", code in RETRIED_STATUS or code >= 500, retry_after(headers),
                        excerpt(_server_message(exc), 120)[1:-1])
    if isinstance(exc, openai.APIConnectionError):
        root = _deepest_message(exc)
        if isinstance(root, _BodyTooLarge):
            return _Failure(str(root), False)
        said = excerpt(str(root), 100)[1:-1]
        return _Failure(f"connection failed ({type(root).__name__}: {said})", True)
    return _Failure(f"{type(exc).__name__}: {excerpt(str(exc), 80)[1:-1]}", False)


def _backoff(retry: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**retry) * (1 - 0.25 * random.random())


# --------------------------------------------------------------------------- the request
@dataclass
class Tally:
    """Requests sent and retries among them, for one request (``chat``)."""

    sent: int = 0

    @property
    def retries(self) -> int:
        return max(0, self.sent - 1)


async def chat(client: Any, limits: Limits, on_send: Callable[[int], None], **create: Any) -> Answer:
    """One chat completion (``client.chat.completions.create(**create)``)
    within ``limits``: retried as the module says, ``on_send(retry)`` called
    for every HTTP request sent (``retry`` is 0 for the first attempt).
    Raises ``LLMRequestError`` with a one-line reason when it fails for good."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.timeout
    tally = Tally()
    while True:
        left = deadline - loop.time()
        budget = left if limits.attempt_timeout is None else min(left, limits.attempt_timeout)
        try:
            attempt = _attempt(client, limits, tally, on_send, budget, create)
            return await asyncio.wait_for(attempt, budget)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reason
            failure = classify(exc, budget)
        wait = failure.retry_after if failure.retry_after is not None else _backoff(tally.retries)
        why_not = _why_not_retry(failure, tally.retries, limits, wait, deadline - loop.time())
        if why_not is not None:
            detail = f": {failure.detail}" if failure.detail else ""
            raise LLMRequestError(f"LLM request failed: {failure.what}, {why_not}{detail}") from None
        await asyncio.sleep(wait)


def _secs(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _why_not_retry(f: _Failure, retries: int, limits: Limits, wait: float, left: float) -> str | None:
    """None when another attempt should be sent after ``wait`` seconds, else
    the phrase saying why not (and how many retries were sent)."""
    sent = _plural(retries, "retry") + " sent"
    if not f.retryable:
        return f"not retried ({sent} before)" if retries else "not retried"
    if retries >= limits.max_retries:
        return f"after {sent} (max_retries = {limits.max_retries})"
    if f.retry_after is not None and wait >= left:
        return (f"not retried: the server asked to wait {_secs(wait)} s (Retry-After), past the "
                f"{limits.timeout:g} s deadline ({sent})")
    if wait >= left:
        return f"then the {limits.timeout:g} s deadline left no time for a retry ({sent})"
    return None


async def _attempt(
    client: Any, limits: Limits, tally: Tally, on_send: Callable[[int], None], budget: float,
    create: dict[str, Any],
) -> Answer:
    # the client's own retry-count header, set to the retries this module sent
    headers = {"x-stainless-retry-count": str(tally.sent), "Accept-Encoding": "identity"}
    on_send(tally.sent)
    tally.sent += 1
    raw = await client.chat.completions.with_raw_response.create(
        **create, timeout=max(budget, 0.001), extra_headers=headers
    )
    http = raw.http_response
    return completion_answer(http.status_code, http.headers.get("content-type", ""), http.content,
                             limits.max_answer_chars, limits.chars_option)


def make_client(api_key: str, base_url: str | None, limits: Limits) -> Any:
    """An ``AsyncOpenAI`` client without its own retries, whose bodies are capped."""
    import openai

    hooks = {"response": [body_cap_hook(limits.max_body_bytes)]}
    http = openai.DefaultAsyncHttpxClient(event_hooks=hooks)
    return openai.AsyncOpenAI(
        api_key=api_key, base_url=base_url, timeout=limits.timeout, max_retries=0, http_client=http
    )
