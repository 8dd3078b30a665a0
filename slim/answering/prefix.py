"""The key/value cache of a prompt prefix every question shares, computed once and reused.

Every TruthfulQA prompt is the same instruction and six-shot primer (~240
tokens) followed by a short question, so most of each prompt's forward pass
is the same work. `PrefixCache.build` runs the shared text once (batch 1, no
edit attached) and keeps its cache; `expand(batch)` hands each batch a cache
that starts from it, and only the rows' own tokens are run on top of it.

Memory: the prefix's keys/values are held once, not once per row. A plain
transformers cache would hold them per row (batch x prefix positions x
layers: 7B at batch 64 about 7.5 GiB), and its first forward concatenates
them with the rows' own into a new tensor anyway. `expand` gives each layer
a `_shared_layer` instead: it keeps only the rows' own keys/values and, in
each forward, hands attention the prefix's (broadcast over the batch)
joined with them, a tensor that lives for that layer's attention only. The
values attention sees are the same, so are the tokens; a cache of another
kind (e.g. sliding-window layers) is copied per row as before.

Rows of different lengths are left padded *after* the prefix:

    [ shared prefix (P) | pad pad | row's own tokens ]      attention mask 1..1 0 0 1..1

with position ids P, P+1, ... on the row's own tokens, which is exactly what
the row would see as one unpadded prompt. A row whose tokens do not start
with the prefix's tokens (a merge across the boundary) is run from its full
prompt instead (`PrefixCache.matches`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging

import torch

from ..models.heads import left_padded_positions

__all__ = [
    "CACHE_TOLERANCE",
    "PrefixCache",
    "cache_argument",
    "cache_tolerance",
    "left_pad",
    "returned_cache",
    "tokenizer_pad_id",
]

log = logging.getLogger(__name__)

# How far the cached and the full prompt's logits may differ, as a share of the logits' spread: rounding
# differs between the two ways of computing the same thing, and 16-bit weights round coarser. bfloat16 keeps
# 8 bits of mantissa to float16's 11, so its rounding, and its tolerance, is 8 times float16's. Measured on
# SmolLM2-135M (CPU): float16 gaps 0.01-0.02, bfloat16 0.1-0.18. A cache whose positions restart at 0
# differs by over 2, caught in every dtype; one whose positions are off by one differs by 0.2-0.5, caught in
# float32 and float16 but within bfloat16's rounding.
CACHE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 4e-1}


def cache_tolerance(dtype: torch.dtype) -> float:
    """The largest gap allowed between cached and full-prompt logits, relative to their std, for a model in
    `dtype` (float16's for a dtype not in CACHE_TOLERANCE)."""
    return CACHE_TOLERANCE.get(dtype, CACHE_TOLERANCE[torch.float16])


def tokenizer_pad_id(tokenizer) -> int:
    """The id padding uses (masked out, so any id works): the pad token, else end of sequence, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def left_pad(seqs: list[list[int]], pad_id: int, past: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids (batch, seq), attention mask (batch, past + seq) and position ids (batch, seq).

    `past` tokens (a shared prefix already in the cache) come before every
    row: the mask covers them, and each row's positions start at `past` on
    its first real token.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    positions = left_padded_positions(mask) + past
    if past:
        mask = torch.cat([torch.ones((len(seqs), past), dtype=torch.long), mask], dim=1)
    return ids, mask, positions


def cache_argument(model) -> str | None:
    """The name `model.forward` takes a key/value cache by: `cache` (transformers 5), `past_key_values` (4.x)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def returned_cache(output):
    """The key/value cache a forward pass returned (`cache` in transformers 5, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class PrefixCache:
    """Token ids of a shared prompt prefix and the model's key/value cache after it (batch 1, unedited)."""

    def __init__(self, ids: list[int], cache):
        self.ids = list(ids)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    @torch.no_grad()
    def build(cls, model, tokenizer, text: str, example: str | None = None) -> "PrefixCache | None":
        """The cache of `text` (tokenized as the start of a prompt), or None with a one-line notice if the model
        cannot continue from a cache with explicit positions and a padded mask (then prompts run in full).

        `example`: a whole prompt starting with `text`; its next-token logits from the cache are checked
        against a plain forward pass of it, so an attention implementation that mishandles the cache is
        caught here rather than in the answers.
        """
        why = None
        params = inspect.signature(model.forward).parameters
        if cache_argument(model) is None or not {"position_ids", "attention_mask"} <= set(params):
            why = "its forward takes no cache or no position_ids"
        ids = list(tokenizer(text)["input_ids"])
        if why is None and not ids:
            why = "the shared prefix has no tokens"
        if why is None:
            device = model.get_input_embeddings().weight.device
            input_ids = torch.tensor([ids], device=device)
            try:
                out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
                cache = returned_cache(out)
            except (TypeError, ValueError, NotImplementedError, RuntimeError) as err:
                cache, why = None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if why is None and not all(
                callable(getattr(cache, m, None)) for m in ("batch_repeat_interleave", "batch_select_indices")
            ):
                why = f"its cache ({type(cache).__name__}) cannot be copied per row"
        if why is None and example is not None:
            why = cls(ids, cache)._disagrees(model, list(tokenizer(example)["input_ids"]))
        if why is not None:
            log.warning("shared-prompt cache off for %s (%s): prompts run in full.", type(model).__name__, why)
            return None
        return cls(ids, cache)

    def _disagrees(self, model, seq: list[int]) -> str | None:
        """Why the cached and the plain forward pass of `seq` differ, or None when they agree."""
        if not self.matches(seq):
            return None  # such a prompt runs in full anyway
        device = model.get_input_embeddings().weight.device
        full = torch.tensor([seq], device=device)
        plain = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, -1].float()
        # Two rows, the first padded, so the check covers the padded mask as well as the cache.
        ids, mask, positions = left_pad([seq[len(self) : -1], seq[len(self) :]], 0, past=len(self))
        cached = (
            model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                **{cache_argument(model): self.expand(2)},
            )
            .logits[1, -1]
            .float()
        )
        allowed = cache_tolerance(model.dtype) * float(plain.std())
        gap = float((plain - cached).abs().max())
        # In 16 bits rounding may also swap two next tokens the full prompt rates within the tolerance.
        tie = 0.0 if model.dtype == torch.float32 else allowed
        if gap > allowed or float(plain[cached.argmax()]) < float(plain.max()) - tie:
            return f"cached logits differ from the full prompt's by {gap:.3g}"
        return None

    def matches(self, seq: list[int]) -> bool:
        """Whether `seq` starts with the prefix's tokens and has at least one token of its own."""
        n = len(self.ids)
        return len(seq) > n and list(seq[:n]) == self.ids

    @property
    def shared(self) -> bool:
        """Whether `expand` shares the prefix's keys/values among the rows (else each row holds a copy)."""
        layers = getattr(self.cache, "layers", None)
        kind = _shared_layer()
        return bool(kind is not None and layers and all(kind.fits(layer) for layer in layers))

    def expand(self, batch: int):
        """A cache for `batch` rows that start with the prefix (the model extends it in place; this one is untouched).

        Each layer holds the prefix's keys/values once, shared with this cache and every other expansion, plus
        the rows' own (`_shared_layer`); a cache of another kind is copied once per row.
        """
        if self.shared:
            cache = copy.copy(self.cache)  # the container only: its layers are replaced, the prefix's not copied
            cache.layers = [_shared_layer()(layer, batch) for layer in self.cache.layers]
            return cache
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache


@functools.cache
def _shared_layer():
    """The class of one layer's cache whose prefix keys/values (1, heads, P, dim) are shared by every row, and which
    holds only the rows' own (batch, heads, seq, dim); None without transformers' DynamicLayer. Built on first use:
    importing transformers' cache module takes seconds."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class SharedPrefixLayer(DynamicLayer):
        """DynamicLayer's keys/values (`keys`, `values`) are the rows' own; `prefix_keys`/`prefix_values` come first."""

        @staticmethod
        def fits(layer) -> bool:
            """Whether `layer` is a plain DynamicLayer holding one row's keys/values (what the prefix's cache is)."""
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            return (
                type(layer) is DynamicLayer
                and isinstance(keys, torch.Tensor)
                and isinstance(values, torch.Tensor)
                and keys.dim() == values.dim() == 4
                and keys.shape[0] == values.shape[0] == 1
                and keys.shape[2] == values.shape[2] > 0
            )

        def __init__(self, prefix, batch: int):
            super().__init__()
            self.prefix_keys, self.prefix_values = prefix.keys, prefix.values  # (1, heads, P, dim), never written
            self.dtype, self.device = prefix.keys.dtype, prefix.keys.device
            # no row's own positions yet: empty (batch, heads, 0, dim), so batch selection works before the first call
            self.keys = prefix.keys.new_empty((batch, prefix.keys.shape[1], 0, prefix.keys.shape[3]))
            self.values = prefix.values.new_empty((batch, prefix.values.shape[1], 0, prefix.values.shape[3]))
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            """Keep the rows' new keys/values; return the prefix's and all the rows' (batch, heads, P + seq, dim)."""
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            batch = self.keys.shape[0]
            # A new tensor, as DynamicLayer's cat returns, but not kept: it lives while this layer attends.
            keys = torch.cat([self.prefix_keys.expand(batch, -1, -1, -1), self.keys], dim=-2)
            values = torch.cat([self.prefix_values.expand(batch, -1, -1, -1), self.values], dim=-2)
            return keys, values

        def get_seq_length(self, *args, **kwargs) -> int:
            return self.prefix_keys.shape[-2] + self.keys.shape[-2]

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0 or -tokens_to_remove > self.keys.shape[-2]:  # a negative count: from the end
                raise NotImplementedError("the shared prompt's cache cannot be cropped into the prefix")
            super().crop(tokens_to_remove)

    return SharedPrefixLayer
