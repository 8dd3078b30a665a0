"""Table 4's inference overhead: the same batches answered plain and edited back to back.

The increase is reported per decoded token (the edit's own cost) and per answer (what a user waits); see
slim.paper.timing for why both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from ..config import check_int
from .timing import Timing, _sync

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# inference overhead


def timed_questions(questions: pd.DataFrame, split_idx: np.ndarray, n: int | None = None) -> pd.DataFrame:
    """The first `n` questions of a split (in the split's order, as --max_questions takes them), ordered as
    answer_questions batches them: longest question first."""
    from ..evaluation.evaluate import split_questions

    if n is not None:
        check_int("n_questions_timed", n, 1)
    qs = split_questions(questions, split_idx, n)
    return qs.iloc[np.argsort(-qs["Question"].str.len().to_numpy(), kind="stable")]


def answer_setup(lm, questions: pd.DataFrame, prefix_cache: bool = True, stop_at_answer: bool = True):
    """(prefix cache or None, stop_at_answer) as answer_questions would answer `questions`: the shared prompt's
    cache built once (untimed), both speed-ups off where the model's generation config needs model.generate."""
    from ..answering.decoding import logit_settings
    from ..answering.prefix import PrefixCache
    from ..answering.prompts import qa_prompt, shared_prefix

    if (prefix_cache or stop_at_answer) and logit_settings(lm.model):
        log.warning(
            "the generation config sets %s, which only model.generate applies: prompts run in full, "
            "without stopping at the answer.",
            ", ".join(logit_settings(lm.model)),
        )
        return None, False
    prefix = None
    if prefix_cache and len(questions):
        example = qa_prompt(questions["Question"].iloc[0])
        prefix = PrefixCache.build(lm.model, lm.tokenizer, shared_prefix(), example=example)
    return prefix, stop_at_answer


def decode_batch(
    lm,
    prompts: list[str],
    edit,
    max_new_tokens: int = 50,
    prefix=None,
    stop_at_answer: bool = False,
    answer_rule: str = "published",
    fixed_length: bool = False,
) -> tuple[list[str], int]:
    """Greedy continuations of a batch (text) and the number of decoded (row, step) positions.

    The path is generate_greedy's: `model.generate` on the full prompts when there is no `prefix` and no
    `stop_at_answer` (every row runs every step; `fixed_length` ignores the end of sequence, so the batch
    decodes exactly max_new_tokens steps), else the shared-prompt cache and/or stopping at the answer, each
    row leaving the batch when it ends.
    """
    from ..answering.decoding import greedy_answer_tokens, greedy_tokens

    tok = lm.tokenizer
    if prefix is None and not stop_at_answer:
        new = greedy_tokens(
            lm.model, tok, prompts, max_new_tokens, edit, min_new_tokens=max_new_tokens if fixed_length else None
        )  # (batch, steps)
        return tok.batch_decode(new, skip_special_tokens=True), int(new.shape[0] * new.shape[1])
    if fixed_length:
        raise ValueError("fixed_length needs the model.generate path: no prefix cache and no stop at the answer.")
    new = greedy_answer_tokens(lm.model, tok, prompts, max_new_tokens, edit, prefix, stop_at_answer, answer_rule)
    return tok.batch_decode(new, skip_special_tokens=True), sum(len(t) for t in new)


@dataclass
class OverheadResult:
    """What paired_overhead measured. `pairs`: one dict per timed pair (batch, repeat, which half ran first,
    rows, seconds and decoded tokens of each half, seconds inside the edit when timed)."""

    prompts: list[str]  # in the order answered, batch after batch
    plain: list[str]  # the warm-up pass's continuations, aligned with prompts
    edited: list[str]
    pairs: list[dict]
    repeats: int
    batch_size: int
    firing_rate: float | None = None  # share of the timed edited positions at which SLIM's layer fired

    @property
    def same(self) -> int:
        """Continuations identical with and without the edit."""
        return sum(a == b for a, b in zip(self.plain, self.edited))

    @property
    def per_token(self) -> Timing:
        """The headline: % increase in time per decoded token, one value per pair."""
        vals = [
            100 * ((p["edited_s"] / p["edited_tokens"]) / (p["plain_s"] / p["plain_tokens"]) - 1) for p in self.pairs
        ]
        return Timing(vals, "%", {"pairs": len(vals)})

    @property
    def per_answer(self) -> Timing:
        """% increase in time per answer (the same rows both ways), one value per pair."""
        vals = [100 * (p["edited_s"] / p["plain_s"] - 1) for p in self.pairs]
        return Timing(vals, "%", {"pairs": len(vals)})

    @property
    def inside_edit(self) -> Timing | None:
        """Time inside the edit's own computation, % of the edited half's time, per pair (None: not timed)."""
        if not self.pairs or self.pairs[0].get("inside_s") is None:
            return None
        return Timing([100 * p["inside_s"] / p["edited_s"] for p in self.pairs], "%", {"pairs": len(self.pairs)})

    def totals(self) -> dict:
        """Seconds and decoded tokens of one pass over all questions each way (averaged over the repeats), and
        the increase of the summed times (not paired)."""
        r = self.repeats
        out = {k: sum(p[k] for p in self.pairs) / r for k in ("plain_s", "edited_s", "plain_tokens", "edited_tokens")}
        out["mean_increase_pct"] = 100 * (out["edited_s"] / out["plain_s"] - 1)
        calls = [p["inside_calls"] for p in self.pairs if p.get("inside_calls") is not None]
        if calls:
            out["inside_s"] = sum(p["inside_s"] for p in self.pairs) / r
            out["inside_calls"] = sum(calls) / r
        return out


def paired_overhead(
    lm,
    prompts: list[str],
    policy,
    batch_size: int = 64,
    max_new_tokens: int = 50,
    repeats: int = 3,
    prefix=None,
    stop_at_answer: bool = False,
    answer_rule: str = "published",
    fixed_length: bool = False,
    time_edit: bool = True,
    decode: Callable = decode_batch,
) -> OverheadResult:
    """Answer `prompts` in batches with and without `policy`, timed pair by pair (see the module docstring).

    One untimed pass each way first (warm-up; its continuations are returned). Then `repeats` rounds: every
    batch plain and edited back to back, the plain half first when (round + batch) is even. `time_edit` also
    clocks the policy's own `edit` (probes, detector, maps) inside the edited half; on a GPU that clock only
    sees the kernel launches, so pass False there. `decode(lm, prompts, edit, max_new_tokens, prefix,
    stop_at_answer, answer_rule, fixed_length)` -> (texts, decoded tokens) decodes one batch (decode_batch).
    """
    check_int("repeats", repeats, 1)
    check_int("batch_size", batch_size, 1)
    if not prompts:
        raise ValueError("paired_overhead needs at least one prompt.")
    batches = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    inside = {"s": 0.0, "calls": 0}
    wrapped = time_edit and "edit" not in vars(policy)  # a policy that already wraps its edit keeps its own

    if wrapped:
        body = policy.edit

        def timed_edit(*args, **kwargs):
            start = time.perf_counter()
            try:
                return body(*args, **kwargs)
            finally:
                inside["s"] += time.perf_counter() - start
                inside["calls"] += 1

        policy.edit = timed_edit  # attach() hands this attribute to the hook

    def run(batch, edit):
        inside.update(s=0.0, calls=0)
        _sync()
        start = time.perf_counter()
        texts, tokens = decode(lm, batch, edit, max_new_tokens, prefix, stop_at_answer, answer_rule, fixed_length)
        _sync()
        return time.perf_counter() - start, texts, max(int(tokens), 1), inside["s"], inside["calls"]

    try:
        plain = [t for b in batches for t in run(b, None)[1]]
        edited = [t for b in batches for t in run(b, policy)[1]]
        reset = getattr(policy, "reset_counts", None)
        if callable(reset):
            reset()  # count the timed passes only
        pairs = []
        for r in range(repeats):
            for j, batch in enumerate(batches):
                plain_first = (r + j) % 2 == 0
                got = {}
                for edit in (None, policy) if plain_first else (policy, None):
                    got["plain" if edit is None else "edited"] = run(batch, edit)
                (ps, _, pt, _, _), (es, _, et, ins, calls) = got["plain"], got["edited"]
                pairs.append(
                    dict(
                        batch=j,
                        repeat=r,
                        first="plain" if plain_first else "edited",
                        rows=len(batch),
                        plain_s=ps,
                        edited_s=es,
                        plain_tokens=pt,
                        edited_tokens=et,
                        inside_s=ins if wrapped else None,
                        inside_calls=calls if wrapped else None,
                    )
                )
    finally:
        if wrapped:
            del policy.edit
    rate = getattr(policy, "firing_rate", None)
    return OverheadResult(
        [p for b in batches for p in b],
        plain,
        edited,
        pairs,
        repeats,
        batch_size,
        firing_rate=rate() if callable(rate) else None,
    )
