"""OpenAIJudge: a completions-API judge (the paper's fine-tuned GPT-judge / GPT-info names)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np

from ..io import kill_point
from .base import (
    Judge,
    JudgeUnavailableError,
    VerdictCache,
    _check_kind,
    _one_line,
    default_cache_dir,
    judge_prompt,
)

log = logging.getLogger(__package__)  # "slim.judges", as before the package split


def p_yes_from_top_logprobs(top: dict | None) -> float:
    """P(" yes") = exp(logprob of " yes") among the returned top log-probs.

    As TruthfulQA's own evaluation: when " yes" is not among the top tokens
    (logprobs=2: usually " yes" and " no") its probability is taken as 0.
    """
    if not top or " yes" not in top:
        return 0.0
    return float(np.exp(top[" yes"]))


class OpenAIJudge(Judge):
    """A fine-tuned completions-API judge (the paper's `--judge_name` / `--info_name`).

    The client is the official `openai` one: the key comes from
    OPENAI_API_KEY only (never stored or printed), the server from `base_url`
    or OPENAI_BASE_URL. Every verdict is cached in a JSON file keyed by a hash
    of (model, prompt), written atomically after each batch, so a rerun never
    asks twice and works without a key when all verdicts are cached. Rate
    limits (429), server errors (5xx), timeouts, connection errors and
    replies that are not JSON are retried with exponential backoff (or after
    the server's Retry-After, at most `backoff_max`); afterwards, or on a
    rejected key (401), a one-line JudgeUnavailableError is raised with the
    verdicts obtained so far already saved.
    """

    RETRY_STATUS = (408, 409, 429)

    def __init__(
        self,
        model_name: str,
        kind: str,
        cache_path: str | os.PathLike | None = None,
        max_retries: int = 6,
        timeout: float = 30.0,
        base_url: str | None = None,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        batch_size: int = 20,
    ):
        if not model_name:
            raise ValueError("OpenAIJudge needs a model name, e.g. --judge_name ft:davinci-002:<org>:<suffix>:<id>.")
        self.model_name = model_name
        self.name = model_name
        self.kind = _check_kind(kind)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)
        self.cache_path = Path(cache_path) if cache_path else default_cache_dir() / f"openai-{slug}.json"
        self.max_retries = max_retries
        self.timeout = timeout
        self.base_url = base_url
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.batch_size = batch_size
        self.n_requests = 0  # API calls made by this judge (cached verdicts cost none)
        self._client = None
        self._cache = VerdictCache(self.cache_path, "slim-openai-judge-cache/1")

    @property
    def identity(self) -> str:
        """`openai:<model>`, with `@<host>` when a server other than the default is named (never the key)."""
        base = self.base_url or os.environ.get("OPENAI_BASE_URL")
        if not base:
            return f"openai:{self.model_name}"
        parts = urlsplit(base)  # host and port only: no user, password, path or query
        host = (parts.hostname or base.rsplit("@", 1)[-1]) + (f":{parts.port}" if parts.port else "")
        return f"openai:{self.model_name}@{host}"

    # cache (slim.judges.base.VerdictCache) -------------------------------------------------
    @property
    def _verdicts(self) -> dict[str, float]:
        return self._cache.verdicts

    def cache_key(self, prompt: str) -> str:
        return VerdictCache.key(self.model_name, prompt)

    def _save_cache(self) -> None:
        self._cache.save()

    # API ----------------------------------------------------------------------------------
    def _unavailable(self, what: str, todo: str) -> JudgeUnavailableError:
        saved = f"{len(self._verdicts)} verdicts are saved in {self.cache_path}"
        return JudgeUnavailableError(
            _one_line(f"OpenAI judge {self.model_name!r} unavailable: {what}; {saved}; {todo}")
        )

    def _get_client(self):
        if self._client is None:
            from openai import OpenAI

            if not os.environ.get("OPENAI_API_KEY"):
                raise self._unavailable(
                    "OPENAI_API_KEY is not set",
                    "export OPENAI_API_KEY (and OPENAI_BASE_URL for another server) or use --judge_name offline.",
                )
            # Retries are ours (counted, logged, with the cache saved between batches), not the client's.
            self._client = OpenAI(base_url=self.base_url, timeout=self.timeout, max_retries=0)
        return self._client

    def _request(self, prompts: list[str]) -> list[float]:
        """P(" yes") of each prompt: one API call, retried on transient failures."""
        client = self._get_client()
        for attempt in range(self.max_retries + 1):
            try:
                self.n_requests += 1
                response = client.completions.create(
                    model=self.model_name, prompt=prompts, max_tokens=1, temperature=0, logprobs=2
                )
                return self._parse(response, len(prompts))
            except Exception as err:
                fatal = self._fatal(err)
                if fatal is not None:
                    raise fatal from None
                if attempt == self.max_retries:
                    raise self._unavailable(
                        f"{_describe(err)} after {self.max_retries + 1} attempts",
                        "check the network / OPENAI_BASE_URL and rerun (cached verdicts are reused).",
                    ) from None
                delay = _retry_after(err)  # the server's Retry-After, when it says one
                if delay is None:
                    delay = min(self.backoff_max, self.backoff_base * 2**attempt) * (0.5 + random.random() / 2)
                delay = min(self.backoff_max, delay)
                log.warning(
                    "OpenAI judge %s: %s; retry %d of %d in %.2fs",
                    self.model_name,
                    _one_line(_describe(err)),
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _fatal(self, err: Exception) -> JudgeUnavailableError | None:
        """The error to raise at once for `err`, or None when it is worth retrying."""
        import openai

        if isinstance(err, JudgeUnavailableError):
            return err
        if isinstance(err, openai.AuthenticationError):
            return self._unavailable(
                f"the API key was rejected ({_describe(err)})",
                "set a valid OPENAI_API_KEY for this server (OPENAI_BASE_URL).",
            )
        if isinstance(err, (openai.APIConnectionError, json.JSONDecodeError)):  # timeouts, garbled replies included
            return None
        if isinstance(err, openai.APIStatusError):
            if err.status_code >= 500 or err.status_code in self.RETRY_STATUS:
                return None
            return self._unavailable(
                f"the request was refused ({_describe(err)})",
                "check the model name (--judge_name / --info_name) and OPENAI_BASE_URL.",
            )
        raise err  # a bug or an unexpected library error: not the API's doing, show it as is

    def _parse(self, response, n: int) -> list[float]:
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != n or any(c.logprobs is None or not c.logprobs.top_logprobs for c in choices):
            raise self._unavailable(
                f"the reply has {len(choices)} choices for {n} prompts or lacks logprobs",
                "use a completions model that returns logprobs.",
            )
        return [p_yes_from_top_logprobs(c.logprobs.top_logprobs[0]) for c in choices]

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        questions, answers = self._pairs(questions, answers)
        prompts = [judge_prompt(q, a, self.kind) for q, a in zip(questions, answers)]
        keys = [self.cache_key(p) for p in prompts]
        todo = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in self._verdicts))
        for lo in range(0, len(todo), self.batch_size):
            batch = todo[lo : lo + self.batch_size]
            for prompt, p_yes in zip(batch, self._request(batch)):
                self._verdicts[self.cache_key(prompt)] = p_yes
            self._save_cache()
            kill_point("judge")
        return np.array([self._verdicts[k] for k in keys], dtype=float)


def _retry_after(err: Exception) -> float | None:
    """The seconds a 429 / 503 reply's `retry-after-ms` or `Retry-After` header asks to wait, if any."""
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) * scale)
        except (KeyError, TypeError, ValueError):  # absent, or an HTTP date: the backoff decides
            continue
    return None


def _describe(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"the reply is not valid JSON (JSONDecodeError: {err})"
    status = getattr(err, "status_code", None)
    label = type(err).__name__ + (f" {status}" if status else "")
    message = getattr(err, "message", "") or str(err)
    return f"{label}: {message[:160]}" if message else label
