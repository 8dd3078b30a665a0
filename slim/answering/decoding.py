"""Batched greedy decoding that continues from the shared prompt's cache and stops a row once its answer is closed."""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch

from ..models.heads import EditFactory
from .prefix import PrefixCache, cache_argument, left_pad, returned_cache, tokenizer_pad_id
from .prompts import answer_closed

log = logging.getLogger(__name__)


# Generation settings that greedy decoding in `model.generate` ignores or that `_decode_rows` honours too.
_GREEDY_SAFE = {
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "do_sample", "num_beams",
    "temperature", "top_p", "top_k", "min_p", "typical_p", "max_length", "max_new_tokens", "use_cache",
    "transformers_version", "_from_model_config", "return_dict_in_generate", "output_scores", "output_logits",
}  # fmt: skip


def logit_settings(model) -> list[str]:
    """Settings of the model's generation config that change greedy tokens (e.g. repetition_penalty)."""
    config = getattr(model, "generation_config", None)
    diff = config.to_diff_dict() if config is not None and hasattr(config, "to_diff_dict") else {}
    return sorted(k for k, v in diff.items() if k not in _GREEDY_SAFE and v not in (None, False, [], {}))


def _eos_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids as `model.generate` uses them (the generation config), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _layer_device(layer, default: torch.device) -> torch.device:
    """Where a cache layer's tensors live: its keys' device, else the device it records, else `default`."""
    keys = getattr(layer, "keys", None)
    if isinstance(keys, torch.Tensor):
        return keys.device
    device = getattr(layer, "device", None)
    return torch.device(device) if isinstance(device, (str, torch.device)) else default


def select_rows(cache, keep: torch.Tensor):
    """Keep the rows `keep` (1-D long index) of a key/value cache, in place; returns the cache.

    Under device_map="auto" each layer's keys and values live on its own GPU, and a tensor cannot be
    indexed by an index on another GPU: each layer gets the index on its own device (copied once per
    device; on one device nothing is copied). A layer selects with its own `batch_select_indices` (which
    knows its other state, e.g. a sliding window's), else by indexing its `keys` and `values`; a cache
    without such `.layers` (a type this code does not know) with the cache's own `batch_select_indices`.
    """
    layers = getattr(cache, "layers", None)
    known = layers is not None and all(
        callable(getattr(layer, "batch_select_indices", None))
        or (
            isinstance(getattr(layer, "keys", None), torch.Tensor)
            and isinstance(getattr(layer, "values", None), torch.Tensor)
        )
        for layer in layers
    )
    if not known:
        cache.batch_select_indices(keep)
        return cache
    on_device = {keep.device: keep}
    for layer in layers:
        device = _layer_device(layer, keep.device)
        if device not in on_device:
            on_device[device] = keep.to(device)
        index = on_device[device]
        if callable(getattr(layer, "batch_select_indices", None)):
            layer.batch_select_indices(index)
        else:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
    return cache


def _decode_rows(
    model,
    tokenizer,
    seqs: list[list[int]],
    prefix: PrefixCache | None,
    max_new_tokens: int,
    stop_at_answer: bool,
    answer_rule: str = "published",
) -> list[list[int]]:
    """Greedy new tokens of each row of `seqs` (each row's own tokens, after `prefix` when given).

    A row ends at an end-of-sequence token or, with `stop_at_answer`, once
    its answer is closed under `answer_rule`; ended rows leave the batch (and the cache).
    """
    device = model.get_input_embeddings().weight.device
    past = len(prefix) if prefix is not None else 0
    ids, mask, positions = (t.to(device) for t in left_pad(seqs, tokenizer_pad_id(tokenizer), past))
    cache = prefix.expand(len(seqs)) if prefix is not None else None
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache_name = cache_argument(model)
    eos = _eos_ids(model, tokenizer)
    rows = list(range(len(seqs)))  # the input row of each row still in the batch
    new: list[list[int]] = [[] for _ in seqs]
    for step in range(max_new_tokens):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_name: cache},
            **keep_last,
        )
        cache = returned_cache(out)
        # (batch,), on the embedding's device: the logits come from the LM head's, the last GPU under "auto"
        next_ids = out.logits[:, -1].argmax(-1).to(device)
        ended = []
        for row, token in zip(rows, next_ids.tolist()):
            new[row].append(token)
            text = tokenizer.decode(new[row], skip_special_tokens=True) if stop_at_answer else ""
            ended.append(token in eos or (stop_at_answer and answer_closed(text, answer_rule)))
        if all(ended) or step + 1 == max_new_tokens:
            break
        if any(ended):
            kept = [i for i, e in enumerate(ended) if not e]
            keep = torch.tensor(kept, device=device)  # (rows left,) on the embedding's device
            select_rows(cache, keep)
            rows = [rows[i] for i in kept]
            next_ids, mask, positions = next_ids[keep], mask[keep], positions[keep]
        ids = next_ids[:, None]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        positions = positions[:, -1:] + 1
    return new


@torch.no_grad()
def greedy_answer_tokens(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 50,
    edit: EditFactory | None = None,
    prefix: PrefixCache | None = None,
    stop_at_answer: bool = True,
    answer_rule: str = "published",
) -> list[list[int]]:
    """New token ids of the greedy continuation of each prompt, the edit active throughout.

    `prefix`: the cache of the text the prompts share (`PrefixCache.build`);
    prompts that do not start with its tokens run in full. The edit is
    applied as in `model.generate` on the full prompt: at the last position
    of every forward call (the prompt's last token, then each new token).
    With `stop_at_answer` a row ends once its answer is closed under
    `answer_rule`; the tokens are then the start of the full continuation and
    the answer extracted under that rule is the same.
    """
    seqs = [list(s) for s in tokenizer(prompts)["input_ids"]]
    cached = [prefix is not None and prefix.matches(s) for s in seqs]
    new: list[list[int]] = [[] for _ in seqs]
    context = edit(model) if edit is not None else contextlib.nullcontext()
    with context:
        for use_prefix in (True, False):
            rows = [i for i, c in enumerate(cached) if c == use_prefix]
            if rows:
                skip = len(prefix) if use_prefix else 0
                group = _decode_rows(
                    model,
                    tokenizer,
                    [seqs[i][skip:] for i in rows],
                    prefix if use_prefix else None,
                    max_new_tokens,
                    stop_at_answer,
                    answer_rule,
                )
                for i, tokens in zip(rows, group):
                    new[i] = tokens
    return new


@torch.no_grad()
def greedy_tokens(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 50,
    edit: EditFactory | None = None,
    device=None,
    min_new_tokens: int | None = None,
) -> torch.Tensor:
    """New token ids (batch, steps) of greedy continuations of left-padded prompts, the edit active throughout.

    The batch stops once every row has ended, but not before `min_new_tokens` steps (if given).
    """
    device = device or model.get_input_embeddings().weight.device
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    context = edit(model) if edit is not None else contextlib.nullcontext()
    with context:
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return out[:, enc["input_ids"].shape[1] :]


def generate_greedy(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 50,
    edit: EditFactory | None = None,
    device=None,
    prefix: PrefixCache | None = None,
    stop_at_answer: bool = False,
    answer_rule: str = "published",
) -> list[str]:
    """Greedy continuations (text) of a batch of prompts, the edit active throughout.

    Plain `model.generate` on the full prompts unless a `prefix` cache is
    given or `stop_at_answer` is set (then `greedy_answer_tokens`, stopping
    where the answer is closed under `answer_rule`).
    """
    if (prefix is not None or stop_at_answer) and logit_settings(model):
        prefix, stop_at_answer = None, False  # answer_questions says so once; here it is quiet
    if prefix is None and not stop_at_answer:
        new_tokens = greedy_tokens(model, tokenizer, prompts, max_new_tokens, edit, device)
    else:
        new_tokens = greedy_answer_tokens(
            model, tokenizer, prompts, max_new_tokens, edit, prefix, stop_at_answer, answer_rule
        )
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
