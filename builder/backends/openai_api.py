"""Remote model backends over the OpenAI chat API: ``openai`` and ``openai-vision``.

Both talk to any OpenAI-compatible endpoint (OpenAI itself, vLLM, Ollama,
llama.cpp's server, ``transformers serve``) through the official ``openai``
client. Each request runs under a total deadline with its own retries
(``openai_requests``: ``timeout`` is the whole request's budget, retries and
waits included; Retry-After is honoured only when it fits; bodies and
answers are length-capped before anything parses or caches them). Requests
for many neurons (or images) run concurrently on one ``AsyncOpenAI`` client,
bounded by a semaphore.

The summarizer asks for N candidates in one request, as a JSON list, checks
the answer (1-5 words and at most 80 characters each, not a copied caption,
distinct after normalization) and re-asks once with a short correction when
the answer is unusable. A neuron whose answer stays unusable, or whose
request fails, gets a ``BackendError`` with a one-line reason in
``summarize_many``'s result; the builder records it as failed and goes on,
and a later build (a resume) asks again.

Secrets come only from options or the environment (``OPENAI_API_KEY``,
``OPENAI_BASE_URL``). Local servers ignore the key, so when a ``base_url``
is set and no key is given a placeholder key is sent.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextvars
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from builder.backends.extractive import normalize_concept
from builder.backends.interfaces import Captioner, CaptionItem, Summarizer
from builder.backends.openai_requests import Answer, Limits, chat, excerpt, make_client
from builder.data_files import data_path
from builder.errors import BackendError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Sent when a base_url is set and no key is given: local servers (vLLM,
# Ollama, llama.cpp, transformers serve) accept any key. Not a secret.
PLACEHOLDER_API_KEY = "not-needed"
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_CONCEPT_WORDS = 5
MAX_CONCEPT_CHARS = 80  # a 1-5 word concept; a 20 MB "word" is not one
# The longest answer text accepted (option max_answer_chars): a JSON list of
# N short concepts is a few hundred characters; anything this long is
# refused before it is parsed or cached.
DEFAULT_MAX_ANSWER_CHARS = 20_000
DEFAULT_MAX_CAPTION_CHARS = 1_000
# Bump when the parsing/validation rules change what is accepted: it is part
# of config_key(), so cached answers produced under older rules are not reused.
# 2: items over MAX_CONCEPT_CHARS are dropped; answers over the length limit refused.
SUMMARIZER_VERSION = 2
# where _json_lists looks for an embedded JSON value: the first this many brackets
_MAX_JSON_STARTS = 256

# requests and tokens of the neuron whose request is in flight (see _many)
_ITEM_USAGE: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("_ITEM_USAGE", default=None)

class LLMAnswerError(ValueError):
    """An answer that is not a usable list of concepts (the reason is the message)."""


# --------------------------------------------------------------------------- prompts
def load_prompt(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """Return ``(text, sha256)`` of a prompt: a file name in ``data/prompts/``
    or a path. The hash goes into cache keys, so editing a prompt file
    invalidates every answer produced with the old text."""
    spec_s = str(spec)
    candidates = [Path(spec_s).expanduser()]
    if not Path(spec_s).is_absolute():
        candidates.append(data_path("prompts", spec_s))
    for p in candidates:
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            return text, hashlib.sha256(text.encode("utf-8")).hexdigest()
    raise BackendError(f"prompt file {spec_s!r} not found (looked for a path and in data/prompts/)")


def fill(template: str, **values: Any) -> str:
    """Substitute ``{name}`` placeholders by plain replacement (not
    ``str.format``), so JSON braces in few-shot examples need no escaping."""
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", str(v))
    return out


# --------------------------------------------------------------------------- parsing
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_LIST_LINE = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|[-*\u2022])\s+(.+?)\s*$")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"


def _json_lists(text: str) -> list[Any]:
    """Every JSON value that starts at a '[' or '{' in ``text`` and decodes."""
    dec = json.JSONDecoder()
    found = []
    for i, m in enumerate(re.finditer(r"[\[{]", text)):
        if i >= _MAX_JSON_STARTS:
            break
        try:
            value, _ = dec.raw_decode(text, m.start())
        except (ValueError, RecursionError):  # deeply nested brackets overflow the decoder
            continue
        found.append(value)
    return found


def _as_strings(value: Any) -> list[str] | None:
    if isinstance(value, dict):  # {"concepts": [...]} and similar wrappers
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else None
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return list(value)
    return None


def parse_candidate_list(text: str) -> list[str] | None:
    """Candidate strings from an LLM answer, or None if it holds no list.

    Tried in order: the whole answer as JSON, JSON inside fenced code blocks,
    the first JSON list of strings embedded in prose, then a numbered or
    bulleted list (one candidate per line)."""
    text = (text or "").strip()
    if not text:
        return None
    chunks = [text, *(m.group(1) for m in _FENCE.finditer(text))]
    for chunk in chunks:
        try:
            got = _as_strings(json.loads(chunk))
        except (ValueError, RecursionError):
            got = None
        if got:
            return got
    for chunk in chunks:
        for value in _json_lists(chunk):
            got = _as_strings(value)
            if got:
                return got
    lines = [m.group(1) for line in text.splitlines() if (m := _LIST_LINE.match(line))]
    if lines:
        return [line.strip().strip(_QUOTES).strip() for line in lines]
    return None


def validate_candidates(items: Sequence[str], captions: Sequence[str], n: int) -> list[str]:
    """Normalized, distinct candidates of 1-5 words, at most ``n``, best first.

    Items that are too long (over 5 words or ``MAX_CONCEPT_CHARS``
    characters), empty, or a copy of a whole caption (of 3+ words: a 1-2
    word caption already is a concept) are dropped; raises
    ``LLMAnswerError`` when none is left."""
    echoes = {c for c in (normalize_concept(x) for x in captions) if len(c.split()) >= 3}
    out: list[str] = []
    dropped: list[str] = []
    for raw in items:
        if len(raw) > 4 * MAX_CONCEPT_CHARS:  # not worth normalizing
            dropped.append(raw)
            continue
        c = normalize_concept(raw)
        words = c.split()
        if not words or len(words) > MAX_CONCEPT_WORDS or len(c) > MAX_CONCEPT_CHARS or c in echoes:
            dropped.append(raw)
            continue
        if c not in out:
            out.append(c)
    if not out:
        shown = "; ".join(repr(_short(d, 40)) for d in dropped[:3])
        raise LLMAnswerError(
            f"no item was a 1-{MAX_CONCEPT_WORDS} word concept of at most {MAX_CONCEPT_CHARS} "
            f"characters that is not a copied caption ({shown})"
        )
    if dropped:
        log.debug("dropped %d unusable candidates: %r", len(dropped), dropped)
    return out[:n]


def _short(text: str, limit: int = 80) -> str:
    one = " ".join(str(text)[: 4 * limit].split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


# --------------------------------------------------------------------------- client plumbing
def _resolve_endpoint(
    base_url: str | None, api_key: str | None, backend: str
) -> tuple[str | None, str]:
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
    if api_key is None:
        if base_url is None:
            raise BackendError(
                f"the {backend} backend needs an API key: set OPENAI_API_KEY, or set base_url "
                "(or OPENAI_BASE_URL) to a local OpenAI-compatible server"
            )
        api_key = PLACEHOLDER_API_KEY
    return (base_url.rstrip("/") if base_url else None), api_key


def _run(make_coro: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, also when the caller
    already runs an event loop (a notebook): then in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())  # type: ignore[arg-type]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()  # type: ignore[arg-type]


def _check_tokens_param(name: str) -> str:
    """Which request field carries the token limit: OpenAI's reasoning models
    refuse ``max_tokens`` and want ``max_completion_tokens``; local servers
    take ``max_tokens``."""
    if name not in ("max_tokens", "max_completion_tokens"):
        raise BackendError("max_tokens_param must be 'max_tokens' or 'max_completion_tokens'")
    return name


class _OpenAIBackend:
    """Options, limits and the client factory shared by both backends."""

    backend_name = "openai"

    def _setup(
        self,
        model: str | None,
        base_url: str | None,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        concurrency: int,
        attempt_timeout: float | None,
        max_answer_chars: int,
        chars_option: str = "max_answer_chars",
    ) -> None:
        if not model:
            raise BackendError(
                f"the {self.backend_name} backend needs a `model` option "
                '(e.g. model = "gpt-4o-mini", or the name your vLLM/Ollama/llama.cpp server serves)'
            )
        self.model = str(model)
        if api_key:
            log.warning(
                "%s: api_key was given as an option; build options are saved in the atlas, "
                "so prefer the OPENAI_API_KEY environment variable",
                self.backend_name,
            )
        self.base_url, self._api_key = _resolve_endpoint(base_url, api_key, self.backend_name)
        try:
            per_attempt = None if attempt_timeout is None else float(attempt_timeout)
            self.limits = Limits(float(timeout), int(max_retries), int(max_answer_chars), per_attempt,
                                 chars_option)
        except BackendError as exc:
            raise BackendError(f"{self.backend_name}: {exc}") from None
        self.timeout, self.max_retries = self.limits.timeout, self.limits.max_retries
        self.concurrency = int(concurrency)
        if self.concurrency < 1:
            raise BackendError(f"{self.backend_name}: concurrency must be >= 1")
        self.usage = {
            "requests": 0,  # HTTP requests sent, retries included
            "retries": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "failed_requests": 0,  # requests that failed for good (after their retries)
        }

    def _client(self) -> Any:
        return make_client(self._api_key, self.base_url, self.limits)

    def _sent(self, retry: int) -> None:
        """Count one HTTP request sent (``retry``: 0 for a request's first attempt)."""
        self.usage["requests"] += 1
        self.usage["retries"] += retry > 0
        item = _ITEM_USAGE.get()
        if item is not None:
            item["requests"] += 1

    def _count(self, answer: Answer) -> None:
        self.usage["prompt_tokens"] += answer.prompt_tokens
        self.usage["completion_tokens"] += answer.completion_tokens
        item = _ITEM_USAGE.get()
        if item is not None:
            item["tokens"] += answer.prompt_tokens + answer.completion_tokens

    async def _chat(self, client: Any, messages: list[dict[str, Any]], **params: Any) -> str:
        """One chat completion under the deadline, with retries; the answer
        text (at most ``max_answer_chars``). Raises ``LLMRequestError``."""
        try:
            answer = await chat(client, self.limits, self._sent, model=self.model, messages=messages,
                                **params)
        except Exception:
            self.usage["failed_requests"] += 1
            raise
        self._count(answer)
        return answer.text


# --------------------------------------------------------------------------- summarizer
class OpenAISummarizer(_OpenAIBackend, Summarizer):
    """Candidate concepts from a chat LLM behind an OpenAI-compatible API.

    Options: ``model`` (required), ``base_url`` (else ``OPENAI_BASE_URL``,
    else OpenAI), ``api_key`` (else ``OPENAI_API_KEY``; a placeholder for
    local servers when ``base_url`` is set), ``temperature`` (None omits it,
    for models that refuse it), ``max_tokens``, ``max_tokens_param``
    (``max_completion_tokens`` for OpenAI's reasoning models), ``timeout``
    (seconds for a whole request: every attempt and wait; the ask and the
    re-ask are two requests), ``attempt_timeout`` (seconds per attempt, so a
    hung attempt can be retried within ``timeout``; None: all that is left),
    ``max_retries`` (retries sent after the first attempt on 408/409/429/5xx,
    connection errors and cut attempts), ``max_answer_chars`` (longer answers
    are refused unparsed), ``concurrency`` (requests in flight), and the
    prompt files ``system_prompt``, ``user_prompt`` (placeholders
    ``{captions}``, ``{n}``) and ``retry_prompt`` (``{reason}``, ``{n}``)."""

    name = "openai"
    backend_name = "openai summarizer"

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        temperature: float | None = 0.7,
        max_tokens: int = 200,
        max_tokens_param: str = "max_tokens",
        timeout: float = 60.0,
        max_retries: int = 4,
        concurrency: int = 8,
        system_prompt: str = "summarize_system.txt",
        user_prompt: str = "summarize_user.txt",
        retry_prompt: str = "summarize_retry.txt",
        attempt_timeout: float | None = None,
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    ) -> None:
        self._setup(model, base_url, api_key, timeout, max_retries, concurrency, attempt_timeout,
                    max_answer_chars)
        self.temperature = None if temperature is None else float(temperature)
        self.max_tokens = int(max_tokens)
        self.max_tokens_param = _check_tokens_param(max_tokens_param)
        self.system_prompt, self._system_sha = load_prompt(system_prompt)
        self.user_prompt, self._user_sha = load_prompt(user_prompt)
        self.retry_prompt, self._retry_sha = load_prompt(retry_prompt)
        if "{captions}" not in self.user_prompt:
            raise BackendError(f"the user prompt {user_prompt!r} has no {{captions}} placeholder")
        self.usage.update({"reasks": 0, "failed_neurons": 0})

    def config_key(self) -> dict[str, Any]:
        """Model, endpoint, sampling parameters and the prompts' hashes; not
        timeouts, retries, length limits or concurrency, which do not change
        an answer that is accepted."""
        return {
            "name": self.name,
            "version": SUMMARIZER_VERSION,
            "model": self.model,
            "base_url": self.base_url or OPENAI_DEFAULT_BASE_URL,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "system_prompt_sha256": self._system_sha,
            "user_prompt_sha256": self._user_sha,
            "retry_prompt_sha256": self._retry_sha,
        }

    def messages(self, captions: Sequence[str], n: int) -> list[dict[str, Any]]:
        """The first request's messages for one neuron."""
        listed = "\n".join(f"{i}. {_short(c, 300)}" for i, c in enumerate(captions, 1))
        return [
            {"role": "system", "content": self.system_prompt.strip()},
            {"role": "user", "content": fill(self.user_prompt, captions=listed, n=n).strip()},
        ]

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {self.max_tokens_param: self.max_tokens}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        return params

    async def _one(self, client: Any, captions: Sequence[str], n: int) -> list[str]:
        if not any(str(c).strip() for c in captions):
            raise BackendError("no captions to summarize")
        messages = self.messages(captions, n)
        reason = ""
        for attempt in range(2):  # the first ask and one re-ask
            # raises LLMRequestError (a BackendError) once its retries are spent
            text = await self._chat(client, messages, **self._params())
            try:
                items = parse_candidate_list(text)
                if items is None:
                    raise LLMAnswerError(f"no JSON or numbered list in the answer {excerpt(text)}")
                return validate_candidates(items, captions, n)
            except LLMAnswerError as exc:
                reason = str(exc)
            if attempt == 0:
                self.usage["reasks"] += 1
                log.debug("re-asking after an unusable answer: %s", reason)
                messages = [
                    *messages,
                    {"role": "assistant", "content": text},
                    {
                        "role": "user",
                        "content": fill(self.retry_prompt, reason=reason, n=n).strip(),
                    },
                ]
        raise BackendError(
            f"LLM answer was not a list of 1-{MAX_CONCEPT_WORDS} word concepts: {reason}"
        )

    async def _many(self, batches: Sequence[Sequence[str]], n: int) -> list[list[str] | Exception]:
        sem = asyncio.Semaphore(self.concurrency)
        client = self._client()

        per_item = [{"requests": 0, "tokens": 0} for _ in batches]

        async def guarded(captions: Sequence[str], acc: dict[str, int]) -> list[str] | Exception:
            _ITEM_USAGE.set(acc)  # each gathered task runs in its own context copy
            async with sem:
                try:
                    return await self._one(client, captions, n)
                except BackendError as exc:
                    self.usage["failed_neurons"] += 1
                    return exc
                except Exception as exc:  # one neuron's surprise must not end the build
                    self.usage["failed_neurons"] += 1
                    log.debug("unexpected summarizer error", exc_info=True)
                    return BackendError(f"unexpected error: {type(exc).__name__}: {_short(exc, 200)}")

        try:
            return list(await asyncio.gather(*(guarded(c, a) for c, a in zip(batches, per_item))))
        finally:
            self.last_item_usage = per_item  # requests and tokens per neuron, for the atlas
            await client.close()

    def summarize_many(
        self, batches: Sequence[Sequence[str]], n: int
    ) -> list[list[str] | Exception]:  # type: ignore[override]
        """One request per neuron, at most ``concurrency`` in flight. A
        neuron whose answer stays unusable after one re-ask, or whose request
        fails for good (after its retries, or at its deadline), gets a
        ``BackendError`` with a one-line reason instead of a list."""
        if not batches:
            return []
        return _run(lambda: self._many(batches, n))

    def summarize(self, captions: Sequence[str], n: int) -> list[str]:
        """Candidates for one neuron; raises ``BackendError`` on failure."""
        (out,) = self.summarize_many([captions], n)
        if isinstance(out, Exception):
            raise out
        return out


# --------------------------------------------------------------------------- vision captioner
def image_data_url(image: Any) -> str:
    """A PIL image as a base64 PNG ``data:`` URL (what vision chat APIs accept inline)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIVisionCaptioner(_OpenAIBackend, Captioner):
    """Captions from a vision chat model behind an OpenAI-compatible API.

    Each image goes inline as a base64 PNG data URL with the prompt file
    ``prompt``. Options: ``model`` (required), ``base_url``, ``api_key``,
    ``max_tokens``, ``max_tokens_param``, ``temperature`` (None omits it), ``detail`` (OpenAI's
    image detail: low/high/auto; None omits it), ``timeout`` (seconds per
    request, retries and waits included), ``attempt_timeout``,
    ``max_retries``, ``max_caption_chars`` (a longer caption is refused,
    not cached), ``concurrency``. A request that fails for good, an empty
    caption or one over the limit raises ``BackendError``."""

    name = "openai-vision"
    backend_name = "openai-vision captioner"

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 40,
        max_tokens_param: str = "max_tokens",
        temperature: float | None = 0.0,
        detail: str | None = None,
        prompt: str = "caption_vision.txt",
        timeout: float = 60.0,
        max_retries: int = 4,
        concurrency: int = 8,
        attempt_timeout: float | None = None,
        max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
    ) -> None:
        self._setup(model, base_url, api_key, timeout, max_retries, concurrency, attempt_timeout,
                    max_caption_chars, "max_caption_chars")
        self.max_tokens = int(max_tokens)
        self.max_tokens_param = _check_tokens_param(max_tokens_param)
        self.temperature = None if temperature is None else float(temperature)
        if detail not in (None, "low", "high", "auto"):
            raise BackendError("detail must be one of low, high, auto (or unset)")
        self.detail = detail
        self.prompt, self._prompt_sha = load_prompt(prompt)

    def config_key(self) -> dict[str, Any]:
        """Model, endpoint, sampling parameters and the prompt's hash."""
        return {
            "name": self.name,
            "model": self.model,
            "base_url": self.base_url or OPENAI_DEFAULT_BASE_URL,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "detail": self.detail,
            "prompt_sha256": self._prompt_sha,
        }

    def messages(self, item: CaptionItem) -> list[dict[str, Any]]:
        """The request's messages for one image."""
        image_url: dict[str, Any] = {"url": image_data_url(item.image)}
        if self.detail:
            image_url["detail"] = self.detail
        return [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": self.prompt.strip()},
                    {"type": "image_url", "image_url": image_url},
                ],
            }
        ]

    async def _one(self, client: Any, item: CaptionItem) -> str:
        params: dict[str, Any] = {self.max_tokens_param: self.max_tokens}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        try:
            text = await self._chat(client, self.messages(item), **params)
        except BackendError as exc:
            raise BackendError(f"captioning {item.source}: {exc}") from None
        caption = " ".join(text.split()).strip(_QUOTES + " ")
        if not caption:
            raise BackendError(
                f"captioning {item.source}: the vision model returned an empty caption"
            )
        return caption

    async def _all(self, items: Sequence[CaptionItem]) -> list[str]:
        sem = asyncio.Semaphore(self.concurrency)
        client = self._client()

        async def guarded(item: CaptionItem) -> str:
            async with sem:
                return await self._one(client, item)

        try:
            got = await asyncio.gather(*(guarded(i) for i in items), return_exceptions=True)
        finally:
            await client.close()
        for g in got:  # every request has ended; report the first failure
            if isinstance(g, BaseException):
                raise g
        return list(got)  # type: ignore[arg-type]

    def caption(self, items: Sequence[CaptionItem]) -> list[str]:
        """One caption per item, in order, at most ``concurrency`` requests in flight."""
        if not items:
            return []
        return _run(lambda: self._all(items))
