"""A batching engine: requests gathered into one decoding batch, each row under its own policy and strength.

A thread takes requests from a queue: it waits a short while (`wait_s`) for
more to arrive, up to `max_batch` rows, then decodes them together. Every
row of the batch may carry another policy (or none): one HeadTrace covers the
layers of all of them, and at each forward call each policy moves the
last-position activations of its own rows only (`Policy.move` on their
(n, H, d) slice), so one forward pass serves every policy. A row leaves the
batch (and the key/value cache, `select_rows`) as soon as it ends: an
end-of-sequence token, a stop string, its `max_tokens`, or its client gone.

Greedy rows (temperature 0) choose as slim.answering.decoding does (argmax of
the last logits, the edit at the last position of every forward call), so a
greedy request returns exactly the tokens `greedy_answer_tokens` returns for
its prompt and policy without `stop_at_answer`. Sampled rows draw from their
own generator (`seed`), with temperature and top-p.

Text is handed out as it is decoded (`Event`s, e.g. for streaming), held back
while it might be the start of a stop string or ends in an incomplete
character.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..answering.decoding import _eos_ids, select_rows
from ..answering.prefix import cache_argument, left_pad, returned_cache, tokenizer_pad_id
from ..models.heads import HeadTrace

__all__ = ["Engine", "Event", "Request", "Sampling", "TokenInfo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How one row decodes. temperature 0: greedy. logprobs: how many alternatives to report per token (0: only
    the chosen token's log-probability; None: none)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenInfo:
    """A chosen token, its log-probability under the (edited) model and the top alternatives [(id, logprob)]."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Event:
    """What a row reports: kind "delta" (new text and the tokens it came from), "done" (finish_reason "stop" or
    "length", every token id) or "error" (a one-line message)."""

    kind: str
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None


@dataclass
class Request:
    """One row: prompt token ids, the policy to apply (None: the unedited model), how to decode, and where its
    events go (`emit` is called from the engine's thread). Set `cancelled` to free the row."""

    prompt: list[int]
    policy: object | None
    sampling: Sampling
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Row:
    """A request's decoding state inside a batch."""

    def __init__(self, req: Request, tokenizer, eos: set[int]):
        self.req, self.tokenizer, self.eos = req, tokenizer, eos
        self.tokens: list[int] = []
        self.pending: list[TokenInfo] = []  # tokens whose text has not been handed out yet
        self.sent = 0  # characters of the text handed out
        self.finish: str | None = None
        seed = req.sampling.seed if req.sampling.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(int(seed))

    def push(self, info: TokenInfo) -> bool:
        """Take the next token; hand out the text that is safe to; True when the row has ended."""
        s = self.req.sampling
        self.tokens.append(info.id)
        self.pending.append(info)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if info.id in self.eos:
            self.finish = "stop"
        cuts = [i for i in (text.find(stop, max(0, self.sent - len(stop))) for stop in s.stop) if i >= 0]
        if cuts:
            text, self.finish = text[: min(cuts)], "stop"
        elif self.finish is None and len(self.tokens) >= s.max_tokens:
            self.finish = "length"
        safe = len(text) if self.finish else len(text) - _held_back(text, s.stop)
        if safe > self.sent or self.finish:
            self.req.emit(Event("delta", text[self.sent : max(safe, self.sent)], self.pending))
            self.sent, self.pending = max(safe, self.sent), []
        if self.finish:
            self.req.emit(Event("done", finish_reason=self.finish, token_ids=list(self.tokens)))
        return self.finish is not None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many final characters to keep back: an incomplete character (U+FFFD from a partial byte sequence), or
    the longest end of `text` that starts a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def _sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """A token drawn from logits (vocab,) at the row's temperature, within its top-p nucleus (on the CPU, so the
    draw is the same on every device for a seed)."""
    probs = torch.softmax(logits.float().cpu() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= s.top_p  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    """Decodes the requests put in its queue, in batches, on a thread of its own (`start`, `close`)."""

    def __init__(self, model, tokenizer, max_batch: int = 16, wait_s: float = 0.005):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.wait_s = int(max_batch), float(wait_s)
        self.device = model.get_input_embeddings().weight.device
        self.eos = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer_pad_id(tokenizer)
        self.cache_name = cache_argument(model)
        params = inspect.signature(model.forward).parameters
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._groups: list[tuple[object, torch.Tensor]] = []  # (policy, its rows' indices) in the running batch

    # ------------------------------------------------------------------ the thread
    def start(self) -> "Engine":
        """Start the decoding thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="slim-serve-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the decoding thread after the batch it is running."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (each one row); their events arrive through their `emit`."""
        for req in requests:
            self._queue.put(req)

    def _gather(self) -> list[Request]:
        """The next batch: the first request in the queue, and those that arrive within `wait_s`, up to
        `max_batch`."""
        first = self._queue.get()
        if first is None:
            return []
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                req = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if req is None:
                self._stopping.set()
                break
            batch.append(req)
        return [r for r in batch if not r.cancelled.is_set()]

    def _loop(self) -> None:
        while not self._stopping.is_set():
            batch = self._gather()
            if batch:
                self.run(batch)

    # ------------------------------------------------------------------ decoding
    def run(self, requests: list[Request]) -> None:
        """Decode `requests` as one batch on the calling thread; an exception fails the rows still running (one
        line each), never the engine."""
        rows = [_Row(r, self.tokenizer, self.eos) for r in requests]
        try:
            self._decode(rows)
        except Exception as err:  # noqa: BLE001 - reported to each request, the engine goes on
            log.warning("a batch of %d rows failed: %s: %s", len(rows), type(err).__name__, err)
            for row in rows:
                if row.finish is None:
                    row.req.emit(Event("error", error=f"{type(err).__name__}: {' '.join(str(err).split())}"))
        finally:
            self._groups = []

    def _regroup(self, rows: list[_Row]) -> None:
        """Each policy of the batch with the indices (on the model's device) of the rows it edits."""
        by_policy: dict[int, tuple[object, list[int]]] = {}
        for i, row in enumerate(rows):
            if row.req.policy is not None:
                by_policy.setdefault(id(row.req.policy), (row.req.policy, []))[1].append(i)
        self._groups = [(p, torch.tensor(idx, device=self.device)) for p, idx in by_policy.values()]

    def _edit(self, layer: int, acts: torch.Tensor) -> None:
        """Move the last position of each policy's rows of acts (batch, seq, H, d), in place."""
        for policy, idx in self._groups:
            if layer in policy.layers:
                idx = idx.to(acts.device)  # under device_map="auto" the layer may sit on another GPU
                acts[idx, -1] = policy.move(layer, acts[idx, -1])  # (rows of this policy, H, d)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[TokenInfo]:
        """The next token of each row from the last logits (rows, vocab)."""
        greedy = logits.argmax(-1).tolist()  # argmax on the device, as greedy_answer_tokens chooses
        out = []
        for i, row in enumerate(rows):
            s = row.req.sampling
            token = greedy[i] if s.temperature == 0 else _sample(logits[i], s, row.generator)
            if s.logprobs is None:
                out.append(TokenInfo(token))
                continue
            logp = torch.log_softmax(logits[i].float(), dim=-1)  # (vocab,)
            top = ()
            if s.logprobs > 0:
                values, ids = logp.topk(s.logprobs)
                top = tuple(zip(ids.tolist(), values.tolist()))
            out.append(TokenInfo(token, float(logp[token]), top))
        return out

    @torch.no_grad()
    def _decode(self, rows: list[_Row]) -> None:
        model = self.model
        ids, mask, positions = (t.to(self.device) for t in left_pad([r.req.prompt for r in rows], self.pad_id))
        layers = sorted({int(l) for r in rows if r.req.policy is not None for l in r.req.policy.layers})
        self._regroup(rows)
        trace = HeadTrace(model, layers=layers, edit=self._edit) if layers else contextlib.nullcontext()
        cache = None
        with trace:
            while rows:
                out = model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{self.cache_name: cache},
                    **self.keep_last,
                )
                cache = returned_cache(out)
                chosen = self._choose(out.logits[:, -1], rows)
                ended = [row.push(info) or row.req.cancelled.is_set() for row, info in zip(rows, chosen)]
                if all(ended):
                    break
                next_ids = torch.tensor([info.id for info in chosen], device=self.device)  # (rows,)
                if any(ended):
                    kept = [i for i, e in enumerate(ended) if not e]
                    keep = torch.tensor(kept, device=self.device)  # (rows left,)
                    select_rows(cache, keep)
                    rows = [rows[i] for i in kept]
                    next_ids, mask, positions = next_ids[keep], mask[keep], positions[keep]
                    self._regroup(rows)
                ids = next_ids[:, None]
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                positions = positions[:, -1:] + 1
