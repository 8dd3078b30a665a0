"""LocalLMJudge: a transformers causal LM judge, P(" yes") from its next-token softmax."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import (
    HASH_CHARS,
    KIND_SUFFIX,
    Judge,
    JudgeUnavailableError,
    _check_kind,
    _one_line,
    files_sha256,
    judge_prompt,
)

log = logging.getLogger(__package__)  # "slim.judges", as before the package split

# The files of a model folder that decide a judge's verdicts: config, weights, tokenizer.
IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken")


def yes_token_id(tokenizer, kind: str) -> int:
    """Id of the token a judge emits for " yes" right after the prompt's "True:" / "Helpful:"."""
    head = f"Q: q\nA: a\n{KIND_SUFFIX[kind]}"
    base = tokenizer(head, add_special_tokens=False)["input_ids"]
    full = tokenizer(head + " yes", add_special_tokens=False)["input_ids"]
    if len(full) <= len(base) or list(full[: len(base)]) != list(base):
        raise ValueError(
            f"this tokenizer does not encode {head[-8:]!r} + ' yes' as a continuation: the judge's "
            "P(' yes') cannot be read from it; use a judge model trained on this prompt format."
        )
    if len(full) - len(base) > 1:
        log.warning("' yes' takes %d tokens in this tokenizer; the judge uses the first one.", len(full) - len(base))
    return int(full[len(base)])


class LocalLMJudge(Judge):
    """A transformers causal LM judge: P(" yes") from the next-token softmax at the end of the prompt.

    `model_name_or_path`: hub id or folder (no remote code), e.g. the public
    allenai/truthfulqa-truth-judge-llama2-7B / -info-judge-llama2-7B. Prompts
    are batched with left padding and explicit position ids, so a batch
    scores exactly as the prompts one by one.
    """

    def __init__(
        self,
        model_name_or_path: str,
        kind: str,
        device: str = "cpu",
        batch_size: int = 8,
        dtype=None,
        model=None,
        tokenizer=None,
    ):
        self.kind = _check_kind(kind)
        self.name = str(model_name_or_path)
        self.device = device
        self.batch_size = batch_size
        if model is None or tokenizer is None:
            model, tokenizer = self._load(self.name, device, dtype)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.yes_id = yes_token_id(tokenizer, self.kind)
        self._identity: str | None = None

    @property
    def identity(self) -> str:
        """`local:<name>@sha256:..` of a folder's config, weight and tokenizer files; `@rev:<commit>` of a hub
        model (the revision transformers resolved); else a sha256 of the parameters in memory. Computed once."""
        if self._identity is None:
            folder = Path(self.name)
            revision = getattr(getattr(self.model, "config", None), "_commit_hash", None)
            if folder.is_dir():
                files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IDENTITY_SUFFIXES)
                self._identity = f"local:{folder.resolve().name}@{files_sha256(files)}"
            elif revision:
                self._identity = f"local:{self.name}@rev:{revision}"
            else:
                self._identity = f"local:{self.name}@{_parameters_sha256(self.model)}"
        return self._identity

    @staticmethod
    def _load(name: str, device: str, dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
            extra = {} if dtype is None else {"dtype": dtype}
            model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False, **extra)
        except (OSError, ValueError) as err:
            raise JudgeUnavailableError(
                _one_line(
                    f"local judge {name!r} could not be loaded "
                    f"({type(err).__name__}); pass a hub id reachable from here "
                    "or a folder with a causal LM and its tokenizer."
                )
            ) from None
        return model.to(device), tokenizer

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        import torch

        from ..answering.likelihood import forward_logits, tokenizer_pad_id

        questions, answers = self._pairs(questions, answers)
        seqs = [list(self.tokenizer(judge_prompt(q, a, self.kind))["input_ids"]) for q, a in zip(questions, answers)]
        out = []
        for lo in range(0, len(seqs), self.batch_size):
            logits, _ = forward_logits(self.model, seqs[lo : lo + self.batch_size], tokenizer_pad_id(self.tokenizer))
            out.append(torch.softmax(logits[:, -1], dim=-1)[:, self.yes_id].cpu().numpy())
        return np.concatenate(out).astype(float) if out else np.zeros(0)


def _parameters_sha256(model) -> str:
    """A short sha256 over the names, shapes, dtypes and bytes of a model's parameters and buffers."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()[:HASH_CHARS]}"
