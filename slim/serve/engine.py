"""A batching engine: requests decoded together in one batch, each row under its own policy and strength.

A thread takes requests from a queue: it waits a short while (`wait_s`) for
more to arrive, up to `max_batch` rows, then decodes them together. Every
row of the batch may carry another policy (or none): one HeadTrace covers the
layers of all of them, and at each forward call each policy moves the
last-position activations of its own rows only (`Policy.move` on their
(n, H, d) slice), so one forward pass serves every policy. A row leaves the
batch (and the key/value cache, `select_rows`) as soon as it ends: an
end-of-sequence token, a stop string, its `max_tokens`, its client gone, or an
error of its own. Requests that arrive while a batch runs join it between two
steps (continuous batching): their prompts run through the model together,
then their keys and values are left-padded to the batch's length and
appended to its cache, the padding masked out. Joining needs a cache of plain
full-attention layers (transformers' DynamicLayer); a model with other layers
(e.g. sliding-window ones) starts a new batch once the running one ends.

Greedy rows (temperature 0) choose as slim.answering.decoding does (argmax of
the last logits, the edit at the last position of every forward call), so a
greedy request returns exactly the tokens `greedy_answer_tokens` returns for
its prompt and policy without `stop_at_answer`. Sampled rows draw from their
own generator (`seed`), with temperature and top-p.

An exception in a policy's edit, a row's sampling or its client's callback
fails that row alone (an "error" event, one line) and the others go on; one
in the model's forward pass fails the rows of that pass (the joiners alone
when it was theirs).

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
    the chosen token's log-probability; None: none). ignore_eos: an end-of-sequence token does not end the row."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False  # decode all max_tokens (vLLM's extra field; for benchmarks)


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
        self.error: str | None = None  # set by a failure of this row's own (edit, sampling, callback)
        seed = req.sampling.seed if req.sampling.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(int(seed))

    def push(self, info: TokenInfo) -> bool:
        """Take the next token; hand out the text that is safe to; True when the row has ended."""
        s = self.req.sampling
        self.tokens.append(info.id)
        self.pending.append(info)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if info.id in self.eos and not s.ignore_eos:
            self.finish = "stop"
        cuts = [i for i in (text.find(stop, max(0, self.sent - len(stop))) for stop in s.stop) if i >= 0]
        if cuts:
            text, self.finish = text[: min(cuts)], "stop"
        elif self.finish is None and len(self.tokens) >= s.max_tokens:
            self.finish = "length"
        safe = len(text) if self.finish else len(text) - _held_back(text, s.stop)
        if safe > self.sent or self.finish:
            self.emit(Event("delta", text[self.sent : max(safe, self.sent)], self.pending))
            self.sent, self.pending = max(safe, self.sent), []
        if self.finish:
            self.emit(Event("done", finish_reason=self.finish, token_ids=list(self.tokens)))
        return self.finish is not None

    def emit(self, event: Event) -> None:
        """Hand an event to the request; a callback that raises (its client gone) ends the row, not the batch."""
        try:
            self.req.emit(event)
        except Exception as err:  # noqa: BLE001 - the client's side, reported in the log only
            log.warning("a row's callback failed, the row leaves its batch: %s", one_line(err))
            self.req.cancelled.set()

    def fail(self, err: BaseException | str) -> None:
        """End the row with an error event (one line), once."""
        if self.finish is None:
            self.finish, self.error = "error", err if isinstance(err, str) else one_line(err)
            self.emit(Event("error", error=self.error))

    @property
    def ended(self) -> bool:
        return self.finish is not None or self.req.cancelled.is_set()


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


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


class _Batch:
    """The rows decoding together and their state: the key/value cache, its attention mask (rows, cached
    positions), each row's last position (rows, 1), the tokens to feed next (rows,) and each policy's rows."""

    def __init__(self, rows, cache, mask, positions, next_ids):
        self.rows, self.cache, self.mask, self.positions, self.next_ids = rows, cache, mask, positions, next_ids
        self.groups: list[tuple[object, torch.Tensor, list[_Row]]] = []

    def keep(self, kept: list[int]) -> None:
        """Keep the rows `kept` (their indices), in the cache too."""
        index = torch.tensor(kept, device=self.mask.device)  # (rows left,)
        select_rows(self.cache, index)
        self.rows = [self.rows[i] for i in kept]
        self.mask, self.positions, self.next_ids = self.mask[index], self.positions[index], self.next_ids[index]


def _joinable(cache) -> bool:
    """Whether rows can be appended to `cache`: every layer a plain full-attention DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` with zeros before it along `dim`, `width` wide in all."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Engine:
    """Decodes the requests put in its queue, in batches, on a thread of its own (`start`, `close`)."""

    def __init__(self, model, tokenizer, max_batch: int = 16, wait_s: float = 0.005, join: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.wait_s, self.join = int(max_batch), float(wait_s), bool(join)
        self.device = model.get_input_embeddings().weight.device
        self.eos = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer_pad_id(tokenizer)
        self.cache_name = cache_argument(model)
        params = inspect.signature(model.forward).parameters
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._groups: list[tuple[object, torch.Tensor, list[_Row]]] = []  # those of the forward pass running
        self._trace: contextlib.ExitStack | None = None
        self._traced: tuple[int, ...] = ()  # the layers the open HeadTrace covers
        self.running = 0  # rows in the running batch (read by /health)
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}  # rows that left, by how (read by /health)

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

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def _take(self, first: Request | None, room: int, wait_s: float) -> list[Request]:
        """Up to `room` requests: `first`, then those in the queue or arriving within `wait_s`."""
        batch, deadline = ([first] if first is not None else []), time.monotonic() + wait_s
        while len(batch) < room:
            left = deadline - time.monotonic()
            try:
                req = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if req is None:
                self._stopping.set()
                break
            batch.append(req)
        self.counts["cancelled"] += sum(r.cancelled.is_set() for r in batch)
        return [r for r in batch if not r.cancelled.is_set()]

    def _loop(self) -> None:
        while not self._stopping.is_set():
            first = self._queue.get()
            if first is None:
                break
            batch = self._take(first, self.max_batch, self.wait_s)
            if batch:
                self.run(batch, join=self.join)

    # ------------------------------------------------------------------ decoding
    def run(self, requests: list[Request], join: bool = False) -> None:
        """Decode `requests` as one batch on the calling thread (with `join`, taking in queued requests while
        it runs). A failure ends the rows it concerns with one line each, never the engine."""
        try:
            with torch.no_grad(), contextlib.ExitStack() as self._trace:
                self._traced = ()
                batch = self._prefill([_Row(r, self.tokenizer, self.eos) for r in requests])
                while batch is not None or (join and not self._stopping.is_set() and self._queue.qsize()):
                    if join and (batch is None or (len(batch.rows) < self.max_batch and _joinable(batch.cache))):
                        room = self.max_batch - (len(batch.rows) if batch is not None else 0)
                        joiners = self._take(None, room, 0.0) if self._queue.qsize() else []
                        if joiners:
                            batch = self._merge(batch, self._prefill([_Row(r, self.tokenizer, self.eos)
                                                                      for r in joiners]))  # fmt: skip
                    if batch is not None:
                        batch = self._step(batch)
        finally:
            self._trace, self._traced, self._groups, self.running = None, (), [], 0

    def _retrace(self, rows: list[_Row]) -> None:
        """Hook the layers the rows' policies edit (a new HeadTrace when that set changes)."""
        layers = tuple(sorted({int(l) for r in rows if r.req.policy is not None for l in r.req.policy.layers}))
        if not set(layers) <= set(self._traced):
            layers = tuple(sorted(set(layers) | set(self._traced)))
            self._trace.close()
            self._trace.enter_context(HeadTrace(self.model, layers=layers, edit=self._edit))
            self._traced = layers

    def _regroup(self, batch: _Batch) -> None:
        """Each policy of the batch with the indices (on the model's device) of the rows it edits."""
        by_policy: dict[int, tuple[object, list[int]]] = {}
        for i, row in enumerate(batch.rows):
            if row.req.policy is not None:
                by_policy.setdefault(id(row.req.policy), (row.req.policy, []))[1].append(i)
        batch.groups = [(p, torch.tensor(idx, device=self.device), [batch.rows[i] for i in idx])
                        for p, idx in by_policy.values()]  # fmt: skip

    def _edit(self, layer: int, acts: torch.Tensor) -> None:
        """Move the last position of each policy's rows of acts (batch, seq, H, d), in place; a policy that
        raises fails its own rows and leaves the others' activations as they are."""
        for policy, idx, rows in self._groups:
            if layer in policy.layers and rows[0].error is None:
                try:
                    idx = idx.to(acts.device)  # under device_map="auto" the layer may sit on another GPU
                    acts[idx, -1] = policy.move(layer, acts[idx, -1])  # (rows of this policy, H, d)
                except Exception as err:  # noqa: BLE001 - this policy's rows fail, the batch goes on
                    for row in rows:
                        row.error = one_line(err)

    def _forward(self, batch: _Batch, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One forward pass of `ids` (rows, seq) with the batch's mask and cache; the last logits (rows, vocab)."""
        self._groups = batch.groups
        try:
            out = self.model(input_ids=ids, attention_mask=batch.mask, position_ids=positions, use_cache=True,
                             **{self.cache_name: batch.cache}, **self.keep_last)  # fmt: skip
        finally:
            self._groups = []
        batch.cache = returned_cache(out)
        return out.logits[:, -1]

    def _choose(self, logits: torch.Tensor, batch: _Batch) -> None:
        """Each row's next token from the last logits (rows, vocab), pushed to the row; the tokens to feed next."""
        greedy = logits.argmax(-1).tolist()  # argmax on the device, as greedy_answer_tokens chooses
        for i, row in enumerate(batch.rows):
            if row.error is not None:
                row.fail(f"the policy's edit failed: {row.error}")
                continue
            s = row.req.sampling
            try:
                token = greedy[i] if s.temperature == 0 else _sample(logits[i], s, row.generator)
                info = TokenInfo(token)
                if s.logprobs is not None:
                    logp = torch.log_softmax(logits[i].float(), dim=-1)  # (vocab,)
                    values, ids = logp.topk(s.logprobs) if s.logprobs > 0 else (logp[:0], logp[:0].long())
                    info = TokenInfo(token, float(logp[token]), tuple(zip(ids.tolist(), values.tolist())))
                row.push(info)
            except Exception as err:  # noqa: BLE001 - this row fails, the batch goes on
                row.fail(err)
                continue
            greedy[i] = token
        batch.next_ids = torch.tensor(greedy, device=self.device)  # (rows,)

    def _finish_step(self, batch: _Batch) -> _Batch | None:
        """Drop the rows that ended; None once none is left."""
        kept = [i for i, row in enumerate(batch.rows) if not row.ended]
        for row in batch.rows:
            if row.ended:
                self.counts["failed" if row.finish == "error" else "finished" if row.finish else "cancelled"] += 1
        if not kept:
            return None
        if len(kept) < len(batch.rows):
            batch.keep(kept)
            self._regroup(batch)
        self.running = len(batch.rows)
        return batch

    def _prefill(self, rows: list[_Row]) -> _Batch | None:
        """The rows' prompts through the model (left-padded), their first tokens chosen; None if none goes on."""
        ids, mask, positions = (t.to(self.device) for t in left_pad([r.req.prompt for r in rows], self.pad_id))
        batch = _Batch(rows, None, mask, positions[:, -1:], None)
        self._regroup(batch)
        try:
            self._retrace(rows)
            logits = self._forward(batch, ids, positions)
        except Exception as err:  # noqa: BLE001 - these rows fail, a batch they were to join goes on
            log.warning("prefilling %d rows failed: %s", len(rows), one_line(err))
            for row in rows:
                row.fail(err)
            self.counts["failed"] += len(rows)
            return None
        self._choose(logits, batch)
        return self._finish_step(batch)

    def _step(self, batch: _Batch) -> _Batch | None:
        """One new token for every row of the batch."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        batch.positions = batch.positions + 1
        try:
            logits = self._forward(batch, batch.next_ids[:, None], batch.positions)
        except Exception as err:  # noqa: BLE001 - the batch's rows fail, the engine goes on
            log.warning("a batch of %d rows failed: %s", len(batch.rows), one_line(err))
            for row in batch.rows:
                row.fail(err)
            self.counts["failed"] += len(batch.rows)
            return None
        self._choose(logits, batch)
        return self._finish_step(batch)

    def _merge(self, batch: _Batch | None, joiners: _Batch | None) -> _Batch | None:
        """The joiners appended to the batch: both caches left-padded to the longer one, the padding masked."""
        if batch is None or joiners is None:
            return batch if joiners is None else joiners
        width = max(batch.mask.shape[1], joiners.mask.shape[1])
        for mine, theirs in zip(batch.cache.layers, joiners.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        merged = _Batch(batch.rows + joiners.rows, batch.cache,
                        torch.cat([_pad_left(batch.mask, width, 1), _pad_left(joiners.mask, width, 1)]),
                        torch.cat([batch.positions, joiners.positions]),
                        torch.cat([batch.next_ids, joiners.next_ids]))  # fmt: skip
        self._regroup(merged)
        self.running = len(merged.rows)
        return merged
