"""Answer files: every question answered once and written per batch.

A rerun resumes where the file ends; answers are never reused under another policy, model or prompt.
On a GPU the batch is capped by what fits in free memory (`batch_that_fits`) and halved when it runs out
of memory anyway; answers already written stay. One run writes a file at a time (`slim.io.artefact_lock`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import ANSWER_RULES, check_choice
from ..io import DamagedArtefact, artefact_lock, kill_point, reading, warn_rebuild, write_checked, write_json
from ..models.heads import EditFactory
from .decoding import generate_greedy, logit_settings
from .prefix import PrefixCache
from .prompts import answer_closed, extract_answer, qa_prompt, shared_prefix

log = logging.getLogger(__name__)


ANSWER_COLUMNS = ["question_idx", "question", "generation", "answer", "answer_rule"]
# Files written before the rule was recorded lack its column: their answers are the paragraph rule's, the only one.
_UNRULED_COLUMNS, _UNRULED_RULE = ANSWER_COLUMNS[:4], "paragraph"


def _answers_so_far(out_csv: Path) -> pd.DataFrame:
    """The answers an earlier (perhaps interrupted) run wrote; none if there is no file or it is damaged."""
    empty = pd.DataFrame(columns=ANSWER_COLUMNS)
    if not out_csv.exists():
        return empty
    try:
        with reading(out_csv, "delete it to answer its questions again."):
            done = pd.read_csv(out_csv, keep_default_na=False, dtype=str)  # an answer "1955" stays text
            if list(done.columns) == _UNRULED_COLUMNS:
                done["answer_rule"] = _UNRULED_RULE
            if list(done.columns) != ANSWER_COLUMNS:
                raise ValueError(f"columns {list(done.columns)}, not {ANSWER_COLUMNS}")
            unknown = sorted(set(done["answer_rule"]) - set(ANSWER_RULES))
            if unknown:
                raise ValueError(f"unknown answer rule {unknown[0]!r}")
            done["question_idx"] = done["question_idx"].astype(int)
    except DamagedArtefact as err:
        warn_rebuild(err, "answering its questions again.")
        return empty
    return done


def _under_rule(done: pd.DataFrame, rule: str, out_csv: Path) -> tuple[pd.DataFrame, bool]:
    """The saved answers as `rule` extracts them, and whether any row changed.

    An answer saved under another rule is extracted again from its saved
    generation where that is exact: the generation is closed under `rule`
    (nothing after it could change the answer), or it is not closed under its
    own rule (so decoding was not stopped early and it is the whole
    continuation). Otherwise decoding stopped where the old rule's answer was
    complete, perhaps before this rule's is: the row is dropped and its
    question answered again.
    """
    old = done[done["answer_rule"] != rule]
    if old.empty:
        return done, False
    exact = pd.Series(
        [answer_closed(g, rule) or not answer_closed(g, r) for g, r in zip(old["generation"], old["answer_rule"])],
        index=old.index,
        dtype=bool,
    )
    again = exact[exact].index
    done = done.copy()
    done.loc[again, "answer"] = [extract_answer(g, rule) for g in done.loc[again, "generation"]]
    done.loc[again, "answer_rule"] = rule
    log.info(
        "%s: %d answers saved under another rule re-extracted under the %s rule from their generations; "
        "%d stopped before the %s rule's answer was complete and are answered again.",
        out_csv,
        len(again),
        rule,
        int((~exact).sum()),
        rule,
    )
    return done.drop(index=exact[~exact].index), True


def answers_source(model, edit, max_new_tokens: int, instruction: bool) -> dict:
    """What decides a file's answers besides the rule: the model, the edit (a policy's digest), the prompt and the
    length. Answers saved under another source are not reused (`answer_questions`)."""
    from ..policies.base import model_fingerprint

    digest = getattr(edit, "digest", None)
    return {
        "model": str(getattr(model.config, "_name_or_path", "")),
        "fingerprint": model_fingerprint(model),
        # an edit factory that is not a Policy cannot be told apart from another: recorded as such
        "edit": None if edit is None else digest() if callable(digest) else "unrecorded",
        "max_new_tokens": int(max_new_tokens),
        "instruction": bool(instruction),
    }


def source_path(out_csv: Path) -> Path:
    return out_csv.with_name(out_csv.stem + ".source.json")


def firing_path(out_csv: Path) -> Path:
    return out_csv.with_name(out_csv.stem + ".firing.json")


class _FiringTally:
    """A detector policy's decoded positions and those where its layer fired, summed over every decode of an
    answer file, an interrupted one and its resumption included, and kept beside it (`firing_path`) after each
    batch, as the answers are. A record of another source, or of answers the file no longer holds, starts over."""

    def __init__(self, edit, out_csv: Path, source: dict, have: set[int]):
        self.edit, self.path = edit, firing_path(out_csv)
        saved = _json_or_none(self.path)
        fresh = {"source": source, "questions": [], "positions": 0, "fired": 0}
        ok = isinstance(saved, dict) and saved.get("source") == source and set(saved.get("questions", [])) <= have
        self.record = saved if ok else fresh
        self.start = (0, 0)

    def begin(self) -> None:
        self.start = self.edit.firing_counts()

    def commit(self, question_idx) -> None:
        """A batch of `question_idx` was answered and written: add its counts (not those of a failed attempt)."""
        positions, fired = self.edit.firing_counts()
        self.record["positions"] += positions - self.start[0]
        self.record["fired"] += fired - self.start[1]
        self.record["questions"] += [int(i) for i in question_idx]
        write_json(self.path, self.record)


def _json_or_none(path: Path):
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def firing_rate_of(out_csv: str | os.PathLike, question_idx) -> float | None:
    """The share of decoded positions at which the layer fired, over every decode of these questions' answers
    in `out_csv` (`_FiringTally`); None where some of them were decoded without a count (read back from a file
    written before counts were kept, or by another source) or nothing was decoded under a detector policy."""
    out_csv = Path(out_csv)
    record, source = _json_or_none(firing_path(out_csv)), _json_or_none(source_path(out_csv))
    if not isinstance(record, dict) or record.get("source") != source or not record.get("positions"):
        return None
    if not {int(i) for i in question_idx} <= set(record.get("questions", [])):
        return None
    return record["fired"] / record["positions"]


def _answered_elsewhere(out_csv: Path, source: dict, done: pd.DataFrame) -> pd.DataFrame:
    """The saved answers if they were made under `source`, else none: the old file is renamed (kept) with one
    warning. A file from before sources were recorded is taken as made under `source` when it is the
    unintervened model's (nothing else decides those), and is answered again under an edit."""
    import json
    import time

    path = source_path(out_csv)
    try:
        saved = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        saved = {"damaged": True}
    if saved is None and source["edit"] is not None:
        # written before sources were recorded: an edited file may come from another fit of the policy
        saved = {**source, "edit": "unrecorded (written before answer sources were recorded)"}
    if saved is not None and saved != source and len(done):
        differs = sorted(k for k in set(saved) | set(source) if saved.get(k) != source.get(k))
        kept = out_csv.with_name(f"{out_csv.stem}.replaced-{time.strftime('%Y%m%d-%H%M%S')}.csv")
        out_csv.rename(kept)
        log.warning(
            "%s holds answers made with another %s: kept as %s; answering again.", out_csv, ", ".join(differs), kept
        )
        done = done.iloc[:0]
    if saved != source:
        write_json(path, source)
    return done


# The share of free GPU memory the answering batch's keys/values and logits may fill: the rest is for the first
# forward's activations and the allocator's fragmentation (an out-of-memory error still halves the batch).
MEMORY_SHARE = 0.8


class AnsweringOutOfMemory(RuntimeError):
    """The GPU ran out of memory answering one question at a time."""


def _cache_layout(model, prefix: PrefixCache | None) -> list[tuple[torch.device, int]]:
    """(device, bytes of one position's keys and values for one row) of each layer's cache: read off the prefix's
    cache where there is one, else from the config (every layer on the embedding's device)."""
    layers = getattr(getattr(prefix, "cache", None), "layers", None) or []
    kv = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    if kv and all(isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 4 for k, v in kv):
        return [
            (k.device, k[0, :, 0].numel() * k.element_size() + v[0, :, 0].numel() * v.element_size()) for k, v in kv
        ]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    except AttributeError:  # a config that names them otherwise: no estimate (running out of memory still halves)
        return []
    device = model.get_input_embeddings().weight.device
    return [(device, 2 * kv_heads * head_dim * model.dtype.itemsize)] * n_layers


def bytes_per_row(model, prefix: PrefixCache | None, own_tokens: int, max_new_tokens: int) -> dict:
    """Bytes one more row of an answering batch needs on each device (torch.device -> bytes), at most; {} when the
    model's cache layout cannot be read.

    Keys/values of the row's `own_tokens` (after the prefix) and `max_new_tokens` in every layer, and of the
    prefix too where the rows do not share it (`PrefixCache.shared`); twice one layer's keys/values of every
    position, joined while it attends (and a copy attention may make); the last position's float32 logits.
    """
    layout = _cache_layout(model, prefix)
    if not layout:
        return {}
    past = len(prefix) if prefix is not None else 0
    held = own_tokens + max_new_tokens + (0 if prefix is not None and prefix.shared else past)
    need: dict = defaultdict(int)
    for device, per_position in layout:
        need[device] += per_position * held
    for device in list(need):
        need[device] += 2 * max(b for d, b in layout if d == device) * (past + own_tokens + max_new_tokens)
    head = model.get_output_embeddings()
    if head is not None:  # its weight (vocab, hidden)
        need[head.weight.device] += head.weight.shape[0] * 4
    return dict(need)


def _free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, counting what PyTorch's allocator holds unused as free."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def batch_that_fits(requested: int, need: dict, label: str = "answers") -> int:
    """`requested` (--answer_batch_size), capped so `need` (bytes per row on each device, `bytes_per_row`) times
    the batch fills at most MEMORY_SHARE of each CUDA device's free memory; one line when capped. Other devices:
    no cap."""
    fits, why = requested, ""
    for device, per_row in need.items():
        if device.type != "cuda" or per_row <= 0:
            continue
        free = _free_bytes(device)
        rows = max(1, int(MEMORY_SHARE * free // per_row))
        if rows < fits:
            fits, why = rows, f"{device}: {free / 2**30:.1f} GiB free, about {per_row / 2**20:.0f} MiB a row"
    if fits < requested:
        log.info("%s: --answer_batch_size %d capped at %d to fit free GPU memory (%s).", label, requested, fits, why)
    return fits


def _on_gpu(model) -> bool:
    """Whether any of the model's weights is on a CUDA device."""
    return any(p.device.type == "cuda" for p in model.parameters())


def _sized_batch(model, tokenizer, prompts: list[str], prefix, max_new_tokens: int, requested: int, label: str) -> int:
    """The batch to start from: `requested` on a CPU; on a GPU capped by free memory for the longest prompt."""
    if not _on_gpu(model):
        return requested
    seqs = tokenizer(prompts)["input_ids"]
    own = max(len(s) - (len(prefix) if prefix is not None and prefix.matches(s) else 0) for s in seqs)
    return batch_that_fits(requested, bytes_per_row(model, prefix, own, max_new_tokens), label)


def _out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the accelerator running out of memory."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err)
    )


def answer_questions(
    model,
    tokenizer,
    questions: pd.DataFrame,
    out_csv: str | os.PathLike,
    edit: EditFactory | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 50,
    instruction: bool = True,
    progress: bool = True,
    prefix_cache: bool = True,
    stop_at_answer: bool = True,
    answer_rule: str = "published",
) -> pd.DataFrame:
    """Answer every question (columns question_idx, Question), writing the CSV after each batch.

    A rerun reads the CSV back and only answers the questions it lacks, so an
    interrupted run resumes; the asked questions' answers are returned in question order. Answers made
    with another model, edit (policy digest), prompt or length (`answers_source`, saved beside the CSV
    as <stem>.source.json) are not reused: that file is renamed and the questions answered again.
    Columns: question_idx, question, generation, answer, answer_rule.
    `prefix_cache` reuses the shared prompt's cache, `stop_at_answer` ends
    each generation where its answer is closed under `answer_rule` (the
    generation column then stops there too). Answers a file holds under
    another rule are re-extracted from their generations, or answered again
    where a generation stopped too early for that (`_under_rule`).
    On a GPU `batch_size` is capped by free memory (`batch_that_fits`), and a batch that runs out of memory is
    answered again in halves (one line each), down to one question (then AnsweringOutOfMemory).
    The file is held (`artefact_lock`) while it is answered: a second run on it waits, then reads what the
    first wrote.
    """
    check_choice("answer_rule", answer_rule, ANSWER_RULES)
    out_csv = Path(out_csv)
    source = answers_source(model, edit, max_new_tokens, instruction)
    with artefact_lock(out_csv):  # read back inside: what a run that held the file before wrote is not redone
        done = _answered_elsewhere(out_csv, source, _answers_so_far(out_csv))
        done, changed = _under_rule(done, answer_rule, out_csv)
        if changed:  # the file says what is returned, whatever happens next
            write_checked(out_csv, lambda tmp: done[ANSWER_COLUMNS].to_csv(tmp, index=False))
        have = set(done["question_idx"].astype(int).tolist())
        todo = questions[~questions["question_idx"].isin(have)]
        counted = callable(getattr(edit, "firing_counts", None)) and len(todo)
        tally = _FiringTally(edit, out_csv, source, have) if counted else None
        # Longest prompts first: batches of similar length pad less.
        todo = todo.assign(_len=todo["Question"].str.len()).sort_values("_len", ascending=False, kind="stable")
        rows = done.to_dict("records")
        only_generate = logit_settings(model)
        if (prefix_cache or stop_at_answer) and only_generate:
            log.warning(
                "the generation config sets %s, which only model.generate applies: prompts run in full, "
                "without stopping at the answer.",
                ", ".join(only_generate),
            )
            prefix_cache = stop_at_answer = False
        prefix = None
        if prefix_cache and len(todo):
            example = qa_prompt(todo["Question"].iloc[0], instruction)
            prefix = PrefixCache.build(model, tokenizer, shared_prefix(instruction), example=example)
        prompts = [qa_prompt(q, instruction) for q in todo["Question"]]
        if prompts:
            batch_size = _sized_batch(model, tokenizer, prompts, prefix, max_new_tokens, batch_size, out_csv.stem)
        generate = functools.partial(
            generate_greedy,
            model,
            tokenizer,
            max_new_tokens=max_new_tokens,
            edit=edit,
            prefix=prefix,
            stop_at_answer=stop_at_answer,
            answer_rule=answer_rule,
        )
        with tqdm(
            total=len(questions),
            initial=len(questions) - len(todo),
            desc=f"answers {out_csv.stem}",
            disable=not progress,
            unit="q",
        ) as bar:
            _answer_in_batches(generate, todo, prompts, rows, batch_size, answer_rule, out_csv, bar, tally)
    # Only the questions asked: the file may hold others (another split or subset answered earlier into it).
    result = pd.DataFrame(rows, columns=ANSWER_COLUMNS)
    result = result[result["question_idx"].isin(questions["question_idx"])]
    return result.sort_values("question_idx").reset_index(drop=True)


def _answer_in_batches(generate, todo, prompts, rows: list[dict], size, answer_rule, out_csv: Path, bar, tally=None):
    """Answer `todo` (its `prompts`) `size` at a time with `generate(prompts)`, appending to `rows` and writing the
    file after each batch (and `tally`'s counts, when given). A batch that runs out of memory is answered again at
    half its size (one line), down to one question; then AnsweringOutOfMemory, every answer so far already
    written."""
    start = 0
    while start < len(todo):
        batch = todo.iloc[start : start + size]
        generations = None
        if tally:
            tally.begin()
        try:
            generations = generate(prompts[start : start + size])
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not _out_of_memory(err):
                raise
        if generations is None:  # out of memory; the error, and the tensors its frames held, are gone here
            if len(batch) == 1:
                raise AnsweringOutOfMemory(
                    f"out of memory answering one question at a time into {out_csv}: lower --answer_batch_size, use a "
                    "smaller --dtype (bf16 or fp16) or --max_new_tokens, or free the GPU (another process may hold "
                    f"its memory); the {len(rows)} answers so far are saved there."
                )
            size = len(batch) // 2
            log.warning("out of memory at batch %d: retrying at %d", len(batch), size)
            torch.cuda.empty_cache()
            continue
        for idx, q, g in zip(batch["question_idx"], batch["Question"], generations):
            answer, rule = extract_answer(g, answer_rule), answer_rule
            rows.append(dict(question_idx=int(idx), question=q, generation=g, answer=answer, answer_rule=rule))
        write_checked(out_csv, lambda tmp: pd.DataFrame(rows, columns=ANSWER_COLUMNS).to_csv(tmp, index=False))
        if tally:
            tally.commit(batch["question_idx"])
        kill_point("answers")
        bar.update(len(batch))
        start += len(batch)
