"""The FastAPI routes: /health, /v1/models, /v1/completions and /v1/chat/completions (plain or streamed).

The request's `model` picks the policy (`<model>+<policy name>`; the base
model: no edit); `"slim": {"strength": x}` sets the policy's knob (kappa,
alpha or strength, slim.evaluation.reports.KNOBS) for that request only, on a
copy of the policy (`at_knob`), never on the one other requests use.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..evaluation.reports import KNOBS
from ..evaluation.sweep import at_knob
from .engine import Engine, Event, one_line
from .engine import Request as Row
from .protocol import (
    APIError,
    Limits,
    Parsed,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
    parse_request,
    usage,
)

__all__ = ["Served", "create_app"]

log = logging.getLogger(__name__)

_POLL_S = 0.25  # how often a reply being decoded checks that its client is still there


@dataclass
class Served:
    """What the server serves: the model's name, the engine decoding for it, its tokenizer, the policies by name,
    the request limits and the API key (None: none asked)."""

    name: str
    engine: Engine
    tokenizer: object
    policies: dict
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    context: int | None = None  # the model's longest sequence (prompt + new tokens), when it has one
    _variants: OrderedDict = field(default_factory=OrderedDict)  # (policy name, strength) -> policy, recent last

    def policy(self, name: str | None, strength: float | None):
        """The policy `name` at `strength` (its own knob value when None); copies are kept for the 32 most
        recent strengths."""
        if name is None:
            return None
        policy = self.policies[name]
        if strength is None:
            return policy
        knob = KNOBS.get(policy.kind)
        if knob is None or knob not in policy.params():
            raise APIError(400, f"slim.strength: a {policy.kind} policy has no strength knob.", "slim.strength")
        key = (name, strength)
        if key not in self._variants:
            try:
                self._variants[key] = at_knob(policy, **{knob: strength})
            except ValueError as err:  # e.g. a negative kappa
                raise APIError(400, f"slim.strength: {' '.join(str(err).split())}", "slim.strength") from None
            while len(self._variants) > 32:
                self._variants.popitem(last=False)
        self._variants.move_to_end(key)
        return self._variants[key]


def _decode_one(tokenizer):
    """A token's text as it reads inside a sequence: decoded after an anchor token that is then cut off, since
    SentencePiece tokenizers drop a token's leading space when it is decoded alone (the judges look for " yes")."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    skip = len(tokenizer.decode(anchor, skip_special_tokens=False))
    return lambda i: tokenizer.decode([*anchor, i], skip_special_tokens=False)[skip:]


def _prompt_ids(served: Served, parsed: Parsed) -> list[list[int]]:
    """The token ids of each prompt (completions: as the tokenizer encodes a prompt; chat: its template)."""
    tok = served.tokenizer
    if parsed.messages is not None:
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"{served.name} has no chat template: use /v1/completions.", "messages")
        text = tok.apply_chat_template(parsed.messages, tokenize=False, add_generation_prompt=True)
        seqs = [list(tok(text, add_special_tokens=False)["input_ids"])]
    else:
        seqs = [list(tok(p)["input_ids"]) for p in parsed.prompts]
    for seq in seqs:
        if not seq:
            raise APIError(400, "prompt: is empty once tokenized.", "prompt")
        if len(seq) > served.limits.max_prompt_tokens:
            raise APIError(400, f"prompt: {len(seq)} tokens, over the limit of {served.limits.max_prompt_tokens}.",
                           "messages" if parsed.messages is not None else "prompt")  # fmt: skip
        if served.context and len(seq) + parsed.sampling.max_tokens > served.context:
            raise APIError(400, f"max_tokens: {len(seq)} prompt tokens + {parsed.sampling.max_tokens} exceed the "
                           f"model's {served.context} positions.", "max_tokens")  # fmt: skip
    return seqs


def _check_key(served: Served, request: Request) -> None:
    if served.api_key is None:
        return
    given = request.headers.get("authorization", "")
    given = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), served.api_key.encode()):
        raise APIError(401, "Incorrect or missing API key (Authorization: Bearer ...).", code="invalid_api_key")


async def _body(served: Served, request: Request) -> dict:
    limit = served.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over {limit} bytes.")
    raw = await request.body()
    if len(raw) > limit:
        raise APIError(413, f"the request body is over {limit} bytes.")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON.") from None


def _submit(served: Served, parsed: Parsed, seqs: list[list[int]]) -> tuple[asyncio.Queue, list[Row]]:
    """Queue one engine row per prompt and choice; their events arrive on one asyncio queue as (index, event)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    policy = served.policy(parsed.policy, parsed.strength)
    rows = []
    for p, seq in enumerate(seqs):
        for j in range(parsed.n):
            index = p * parsed.n + j
            s = parsed.sampling
            if s.seed is not None and j:  # each choice its own draw, reproducible from the request's seed
                s = type(s)(**{**s.__dict__, "seed": s.seed + j})

            def emit(event: Event, index=index):
                loop.call_soon_threadsafe(events.put_nowait, (index, event))

            rows.append(Row(seq, policy, s, emit))
    served.engine.submit(rows)
    return events, rows


def _choice_delta(parsed: Parsed, served: Served, index: int, event: Event, offset: int) -> dict:
    """The part of a choice an event adds: text (or a chat delta) and its logprobs."""
    decode = _decode_one(served.tokenizer)
    want = parsed.sampling.logprobs is not None
    if parsed.messages is not None:
        lp = chat_logprobs(event.tokens, decode) if want else None
        return {"index": index, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}
    lp = completion_logprobs(event.tokens, decode, offset) if want else None
    return {"index": index, "text": event.text, "logprobs": lp, "finish_reason": None}


async def _complete(served: Served, parsed: Parsed, seqs: list[list[int]], request: Request) -> dict | None:
    """The whole reply, once every choice has ended; None (and the rows freed) if the client goes away first."""
    events, rows = _submit(served, parsed, seqs)
    texts, tokens, finish = [""] * len(rows), [[] for _ in rows], [None] * len(rows)
    generated, left = 0, len(rows)
    loop_time = asyncio.get_running_loop().time
    last_check = loop_time()
    try:
        while left:
            try:
                index, event = await asyncio.wait_for(events.get(), timeout=_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if loop_time() - last_check >= _POLL_S:  # events may flow without pause: check by the clock
                last_check = loop_time()
                if await request.is_disconnected():  # nobody to answer: `finally` frees the rows
                    return None
            if event is None:
                continue
            if event.kind == "error":
                raise APIError(500, f"decoding failed: {event.error}", kind="server_error")
            if event.kind == "delta":
                texts[index] += event.text
                tokens[index] += event.tokens
            else:
                finish[index], generated, left = event.finish_reason, generated + len(event.token_ids), left - 1
    finally:
        for row in rows:
            row.cancelled.set()  # rows still running (an error, a client gone) leave their batch
    decode = _decode_one(served.tokenizer)
    want = parsed.sampling.logprobs is not None
    choices = []
    for i, text in enumerate(texts):
        if parsed.messages is not None:
            lp = chat_logprobs(tokens[i], decode) if want else None
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": finish[i]})  # fmt: skip
        else:
            lp = completion_logprobs(tokens[i], decode, 0) if want else None
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish[i]})
    chat = parsed.messages is not None
    return {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion" if chat else "text_completion",
        "created": now(),
        "model": parsed.model,
        "choices": choices,
        "usage": usage(sum(len(s) for s in seqs), generated),
    }


async def _stream(served: Served, parsed: Parsed, seqs: list[list[int]]):
    """Server-sent events: a chunk per piece of text, one per choice's end, [DONE]; a client that goes away
    frees its rows (the generator is closed, `finally` cancels them)."""
    events, rows = _submit(served, parsed, seqs)
    chat = parsed.messages is not None
    head = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion.chunk" if chat else
            "text_completion", "created": now(), "model": parsed.model}  # fmt: skip

    def chunk(choices, **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    offsets, generated, left = [0] * len(rows), 0, len(rows)
    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(rows))])  # fmt: skip
        while left:
            index, event = await events.get()
            if event.kind == "error":
                err = APIError(500, f"decoding failed: {event.error}", kind="server_error")
                yield f"data: {json.dumps(error_body(err))}\n\n"
                return
            if event.kind == "delta":
                yield chunk([_choice_delta(parsed, served, index, event, offsets[index])])
                offsets[index] += len(event.text)
            else:
                generated, left = generated + len(event.token_ids), left - 1
                end = {"index": index, "logprobs": None, "finish_reason": event.finish_reason}
                yield chunk([{**end, **({"delta": {}} if chat else {"text": ""})}])
        if parsed.include_usage:
            yield chunk([], usage=usage(sum(len(s) for s in seqs), generated))
        yield "data: [DONE]\n\n"
    finally:
        for row in rows:
            row.cancelled.set()


def create_app(served: Served) -> FastAPI:
    """The ASGI application serving `served`."""
    app = FastAPI(title="slim.serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(error_body(err), status_code=err.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        log.warning("request failed: %s: %s", type(err).__name__, err)
        message = one_line(err)
        return JSONResponse(error_body(APIError(500, message, kind="server_error")), status_code=500)

    @app.get("/health")
    async def health():
        engine = served.engine
        return {"status": "ok", "running": engine.running, "queued": engine.queued, **engine.counts}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(served, request)
        ids = [served.name, *(f"{served.name}+{name}" for name in served.policies)]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "slim"} for i in ids]}

    async def answer(request: Request, chat: bool):
        _check_key(served, request)
        body = await _body(served, request)
        parsed = parse_request(body, chat, served.name, served.policies, served.limits)
        seqs = _prompt_ids(served, parsed)
        served.policy(parsed.policy, parsed.strength)  # a bad strength is a 400 before anything streams
        if parsed.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(_stream(served, parsed, seqs), media_type="text/event-stream", headers=headers)
        return await _complete(served, parsed, seqs, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app
