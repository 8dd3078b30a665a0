"""Answer files: every question answered once and written per batch.

A rerun resumes where the file ends; answers are never reused under another policy, model or prompt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..config import ANSWER_RULES, check_choice
from ..io import DamagedArtefact, kill_point, reading, warn_rebuild, write_checked, write_json
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
    """
    check_choice("answer_rule", answer_rule, ANSWER_RULES)
    out_csv = Path(out_csv)
    source = answers_source(model, edit, max_new_tokens, instruction)
    done = _answered_elsewhere(out_csv, source, _answers_so_far(out_csv))
    done, changed = _under_rule(done, answer_rule, out_csv)
    if changed:  # the file says what is returned, whatever happens next
        write_checked(out_csv, lambda tmp: done[ANSWER_COLUMNS].to_csv(tmp, index=False))
    have = set(done["question_idx"].astype(int).tolist())
    todo = questions[~questions["question_idx"].isin(have)]
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
    with tqdm(
        total=len(questions),
        initial=len(questions) - len(todo),
        desc=f"answers {out_csv.stem}",
        disable=not progress,
        unit="q",
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo.iloc[start : start + batch_size]
            prompts = [qa_prompt(q, instruction) for q in batch["Question"]]
            generations = generate_greedy(
                model,
                tokenizer,
                prompts,
                max_new_tokens,
                edit,
                prefix=prefix,
                stop_at_answer=stop_at_answer,
                answer_rule=answer_rule,
            )
            for idx, q, g in zip(batch["question_idx"], batch["Question"], generations):
                answer, rule = extract_answer(g, answer_rule), answer_rule
                rows.append(dict(question_idx=int(idx), question=q, generation=g, answer=answer, answer_rule=rule))
            write_checked(out_csv, lambda tmp: pd.DataFrame(rows, columns=ANSWER_COLUMNS).to_csv(tmp, index=False))
            kill_point("answers")
            bar.update(len(batch))
    # Only the questions asked: the file may hold others (another split or subset answered earlier into it).
    result = pd.DataFrame(rows, columns=ANSWER_COLUMNS)
    result = result[result["question_idx"].isin(questions["question_idx"])]
    return result.sort_values("question_idx").reset_index(drop=True)
