"""The OpenAI request fields the server reads, checked one by one (a 400 naming the field), and its reply shapes."""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass

from .engine import Sampling, TokenInfo

__all__ = ["APIError", "Limits", "Parsed", "error_body", "parse_request"]


class APIError(Exception):
    """An error reply in OpenAI's shape: HTTP status, one-line message, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_body(err: APIError) -> dict:
    """{"error": {message, type, param, code}}, as the OpenAI client reads it."""
    return {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: body bytes, prompt tokens, max_tokens, n (choices per prompt), prompts."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_n: int = 8
    max_prompts: int = 32  # the OpenAI judge sends 20 at a time


@dataclass
class Parsed:
    """A checked request: the served model's name and its policy name (None: the base model), the strength
    override, how to decode, the choices per prompt, and what to reply with."""

    model: str
    policy: str | None
    strength: float | None
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    prompts: list | None = None  # completions: list[str]
    messages: list | None = None  # chat: [{"role", "content"}]
    top_logprobs: int | None = None


def _bad(param: str, what: str) -> APIError:
    return APIError(400, f"{param}: {what}", param)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a number, got {value!r}.")
    if value > hi or value < lo or (lo_open and value == lo):
        raise _bad(name, f"must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}, got {value!r}.")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {value!r}.")
    if not lo <= value <= hi:
        raise _bad(name, f"must be between {lo} and {hi}, got {value}.")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "must be a non-empty string or a list of at most 4 of them.")
    return tuple(stops)


def _model(body: dict, base: str, policies: dict) -> tuple[str, str | None]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required: the base model or <model>+<policy> (GET /v1/models lists them).")
    if model == base:
        return model, None
    name = model[len(base) + 1 :] if model.startswith(base + "+") else None
    if name not in policies:
        raise APIError(404, f"The model {model!r} does not exist: GET /v1/models lists those served.", "model",
                       code="model_not_found")  # fmt: skip
    return model, name


def _strength(body: dict, policy: str | None) -> float | None:
    extra = body.get("slim")
    if extra is None:
        return None
    if not isinstance(extra, dict) or set(extra) - {"strength"}:
        raise _bad("slim", 'must be an object with one field, e.g. {"strength": 20}.')
    if extra.get("strength") is None:
        return None
    if policy is None:
        raise _bad("slim.strength", "the base model has no policy to set: ask for <model>+<policy>.")
    value = extra["strength"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad("slim.strength", f"must be a finite number, got {value!r}.")
    return float(value)


def _unsupported(body: dict) -> None:
    """Fields this server does not implement, refused rather than ignored when they would change the reply."""
    for name, neutral in (("echo", False), ("best_of", 1), ("presence_penalty", 0), ("frequency_penalty", 0),
                          ("logit_bias", {}), ("suffix", None), ("tools", None)):  # fmt: skip
        if body.get(name) not in (None, neutral):
            raise _bad(name, "is not supported by this server.")


def parse_request(body, chat: bool, base: str, policies: dict, limits: Limits) -> Parsed:
    """The checked fields of a /v1/completions (chat False) or /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object.")
    _unsupported(body)
    model, policy = _model(body, base, policies)
    default_max = min(256, limits.max_tokens) if chat else 16
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, max_name, default_max, 1, limits.max_tokens)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    n = _integer(body, "n", 1, 1, limits.max_n)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be true or false, got {stream!r}.")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    if chat:
        logprobs = body.get("logprobs", False)
        if logprobs not in (None, True, False):
            raise _bad("logprobs", "must be true or false in a chat request.")
        top = _integer(body, "top_logprobs", None, 0, 20)
        if top is not None and not logprobs:
            raise _bad("top_logprobs", "needs logprobs: true.")
        report = (top or 0) if logprobs else None
    else:
        report = _integer(body, "logprobs", None, 0, 5)
        top = None
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", f"must be true or false, got {ignore_eos!r}.")
    sampling = Sampling(max_tokens, temperature, top_p, seed, _stops(body), report, ignore_eos)
    parsed = Parsed(model, policy, _strength(body, policy), sampling, n, stream, include_usage, top_logprobs=top)
    if chat:
        messages = body.get("messages")
        ok = isinstance(messages, list) and messages
        ok = ok and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        ok = ok and all(isinstance(m.get("content"), str) for m in messages)
        if not ok:
            raise _bad("messages", "must be a non-empty list of {role, content} with string content.")
        parsed.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise _bad("prompt", "must be a string or a non-empty list of strings.")
        if len(prompts) > limits.max_prompts:
            raise _bad("prompt", f"at most {limits.max_prompts} prompts per request, got {len(prompts)}.")
        parsed.prompts = prompts
    return parsed


# ---------------------------------------------------------------------------------------------- replies
def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(tokens: list[TokenInfo], decode, offset: int) -> dict:
    """The legacy completions `logprobs` object of `tokens`, text offsets counted from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text = decode(t.id)
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({decode(i): lp for i, lp in t.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokens: list[TokenInfo], decode) -> dict:
    """The chat `logprobs` object of `tokens`: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(i, lp):
        text = decode(i)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens]}
