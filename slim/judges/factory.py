"""make_judge: a judge back end from its name (offline, local:<id>, allenai, openai:<model>)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .base import Judge, _check_kind

# One flag value for the public Llama-2-7B judge pair (about 0.95 agreement with TruthfulQA's human labels).
PUBLIC_PAIRS = {
    "allenai": {
        "truth": "allenai/truthfulqa-truth-judge-llama2-7B",
        "info": "allenai/truthfulqa-info-judge-llama2-7B",
    }
}


def make_judge(name: str, kind: str, *, tqa_dir=None, device: str = "cpu", cache_dir=None, **kw) -> Judge:
    """A judge from its name.

    Back ends:
        "offline"              OfflineJudge (slim.judges.offline): trained here on TruthfulQA's labelled
                               judge data (finetune_truth/info.jsonl) and the project's labelled answers
                               of its own model (data/judge-labels), with sentence-embedding and
                               reference features; cross-fitted by question.
        "offline-human"        the same trained on TruthfulQA's human labels only.
        "local:<id-or-folder>" LocalLMJudge (slim.judges.local): a transformers causal LM judge (e.g. the
                               public Llama-2-7B truth/info judges), P(" yes") from its next-token softmax.
        "allenai"              the public pair: local:allenai/truthfulqa-truth-judge-llama2-7B for kind
                               "truth", local:allenai/truthfulqa-info-judge-llama2-7B for "info".
        "openai:<model>"       OpenAIJudge (slim.judges.openai): a completions-API model, as the paper's
                               --judge_name / --info_name (fine-tuned davinci-002 names).
        any other bare name    the same as "openai:<name>" (the paper's flags take bare model names);
                               a bare name that looks like a hub id or folder ("org/name", an existing
                               path) is refused, so a local model is never sent to the API by mistake.

    Keyword arguments go to the back end that takes them: tqa_dir and
    cache_dir to "offline"; device (the run's: cpu, cuda:N, or auto: a GPU when
    there is one), cache_dir (its verdicts, local-<identity>.json) and
    LocalLMJudge's options to a local judge; cache_dir (a folder holding
    openai-<model>.json) and OpenAIJudge's options to the API judge.
    """
    _check_kind(kind)
    if not name or not name.strip():
        raise ValueError("empty judge name: use 'offline', 'local:<hub-id-or-folder>' or 'openai:<model>'.")
    name = name.strip()
    if name in ("offline", "offline-human"):
        from .offline import OfflineJudge

        if name == "offline-human":
            kw["answer_labels"] = False
        return OfflineJudge(kind, tqa_dir=tqa_dir, cache_dir=cache_dir, **kw)
    if name in PUBLIC_PAIRS:
        name = f"local:{PUBLIC_PAIRS[name][kind]}"
    if name.startswith("local:"):
        from .local import LocalLMJudge

        return LocalLMJudge(name[len("local:") :], kind, device=device, cache_dir=cache_dir, **kw)
    if name.startswith("openai:"):
        model = name[len("openai:") :]
    elif "/" in name or os.path.exists(name):
        raise ValueError(
            f"judge {name!r} looks like a hub id or folder: write local:{name} for a transformers "
            f"judge or openai:{name} for an API model."
        )
    else:
        model = name  # the paper's --judge_name: a (fine-tuned) completions model
    if cache_dir is not None and "cache_path" not in kw:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
        kw["cache_path"] = Path(cache_dir) / f"openai-{slug}.json"
    from .openai import OpenAIJudge

    return OpenAIJudge(model, kind, **kw)
