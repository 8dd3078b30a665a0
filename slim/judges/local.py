"""LocalLMJudge: a transformers causal LM judge, P(" yes") from its next-token softmax."""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .base import (
    HASH_CHARS,
    KIND_SUFFIX,
    Judge,
    JudgeUnavailableError,
    VerdictCache,
    _check_kind,
    _one_line,
    default_cache_dir,
    files_sha256,
    judge_prompt,
)

log = logging.getLogger(__package__)  # "slim.judges", as before the package split

# The files of a model folder that decide a judge's verdicts: config, weights, tokenizer.
IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken")
FLAGS = {"truth": "--judge_name", "info": "--info_name"}  # the flag that names a judge of each kind
BATCH = {"cpu": 8, "cuda": 32}  # default prompts per forward pass
CACHE_FORMAT = "slim-local-judge-cache/1"
SAVE_EVERY_S = 60.0  # verdicts are also saved during a long scoring pass, so a killed run keeps most of them


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


def judge_device(device) -> str:
    """The device a local judge runs on: "cpu", "cuda:N", or for "auto" cuda:0 when CUDA is available, else cpu
    (a torch.device or a GPU index is taken as `--device` takes it)."""
    from ..models.loading import resolve_device

    resolved = resolve_device("auto" if device is None else str(device))
    return "cuda:0" if resolved == "auto" else resolved


class LocalLMJudge(Judge):
    """A transformers causal LM judge: P(" yes") from the next-token softmax at the end of the prompt.

    `model_name_or_path`: hub id or folder (no remote code), e.g. the public
    allenai/truthfulqa-truth-judge-llama2-7B / -info-judge-llama2-7B. On a GPU
    (`device` cuda:N, or auto on a CUDA machine) it loads straight there in
    half precision (the checkpoint's fp16 / bf16, else fp16; `dtype` to choose),
    on the CPU in fp32. Prompts are sorted by length and batched (32 on a GPU,
    8 on the CPU) with left padding and explicit position ids, so a batch
    scores exactly as the prompts one by one; only the last position's logits
    are computed. Verdicts are cached by (identity, prompt) in
    `<cache_dir>/local-<identity>.json` (default: slim.judges.default_cache_dir()),
    and the model is loaded on the first verdict not cached: a rerun whose
    verdicts are all cached loads none. The config is read at once, so a name
    that cannot load stops before any answering.
    """

    def __init__(
        self,
        model_name_or_path: str,
        kind: str,
        device="cpu",
        batch_size: int | None = None,
        dtype=None,
        model=None,
        tokenizer=None,
        cache_dir=None,
    ):
        self.kind = _check_kind(kind)
        self.name = str(model_name_or_path)
        self.device = judge_device(device)
        self.batch_size = batch_size or BATCH["cuda" if self.device.startswith("cuda") else "cpu"]
        self.dtype = dtype  # None: auto (slim.models.placement.resolve_dtype)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.model = self.tokenizer = None
        if model is not None and tokenizer is not None:
            self._use(model, tokenizer)
            self._config = getattr(model, "config", None)
        else:
            self._config = self._read_config(self.name)  # a judge that cannot load stops here, before answering
        self._identity: str | None = None
        self._cache: VerdictCache | None = None
        self.n_forward = 0  # forward passes run (cached verdicts cost none)

    # loading ------------------------------------------------------------------------------
    def _unavailable(self, what: str) -> JudgeUnavailableError:
        return JudgeUnavailableError(
            _one_line(
                f"{FLAGS[self.kind]} local:{self.name}: the judge could not be loaded ({what}); pass a hub id "
                "reachable from here (check the network / HF_TOKEN) or a folder with a causal LM and its tokenizer, "
                "or another judge (e.g. offline)."
            )
        )

    def _read_config(self, name: str):
        """The checkpoint's config (small: no weights), which names its revision; one line when unreadable."""
        from transformers import AutoConfig

        from ..io import parse_errors

        try:
            return AutoConfig.from_pretrained(name, trust_remote_code=False)
        except parse_errors() as err:
            raise self._unavailable(f"{type(err).__name__}: {str(err)[:160]}") from None

    def load_dtype(self):
        """The dtype the weights load in: `dtype`, else fp32 on the CPU and the checkpoint's fp16 / bf16 (else fp16)
        on a GPU."""
        from ..models.placement import resolve_dtype

        return resolve_dtype(self.dtype, self.device, self.name)

    def memory_need(self) -> int:
        """Bytes the weights will take on the judge's GPU when it loads; 0 on the CPU or once loaded."""
        if self.model is not None or not self.device.startswith("cuda"):
            return 0
        from ..io import parse_errors
        from ..models.placement import model_bytes

        try:
            return model_bytes(self.name, self.load_dtype())
        except parse_errors():  # the config went unreadable since: loading says so in one line
            return 0

    def _use(self, model, tokenizer) -> None:
        try:
            self.yes_id = yes_token_id(tokenizer, self.kind)
        except ValueError as err:
            raise JudgeUnavailableError(_one_line(f"{FLAGS[self.kind]} local:{self.name}: {err}")) from None
        self.model, self.tokenizer = model.eval(), tokenizer
        self._params = set(inspect.signature(model.forward).parameters)
        self._input_device = next(model.parameters()).device

    def _ensure_loaded(self) -> None:
        if self.model is None:
            model, tokenizer = self._load(self.name, self.device, self.load_dtype())
            self._use(model, tokenizer)
            log.info("local judge %s loaded on %s (%s)", self.name, self.device, str(model.dtype).split(".")[-1])

    def _load(self, name: str, device: str, dtype):
        """Tokenizer and model, the weights straight onto `device` in `dtype` (no copy on the host for a GPU)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..io import parse_errors

        revision = getattr(self._config, "_commit_hash", None)
        pin = {"revision": revision} if revision and not Path(name).is_dir() else {}  # the identity's revision
        kwargs = {"dtype": dtype, "trust_remote_code": False, **pin}
        if device.startswith("cuda"):
            kwargs["device_map"] = {"": device}
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False, **pin)
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise self._unavailable(f"not enough free memory on {device}") from None
        except (*parse_errors(), ImportError) as err:  # missing or damaged files, a tokenizer's missing library
            raise self._unavailable(f"{type(err).__name__}: {str(err)[:160]}") from None
        model.requires_grad_(False)
        return model, tokenizer

    # identity and verdicts ------------------------------------------------------------------
    @property
    def identity(self) -> str:
        """`local:<name>@sha256:..` of a folder's config, weight and tokenizer files; `@rev:<commit>` of a hub
        model (the revision its config resolved to, or the one transformers loaded); else a sha256 of the
        parameters in memory (loading the model). Computed once."""
        if self._identity is None:
            folder = Path(self.name)
            config = getattr(self.model, "config", None) or self._config
            revision = getattr(config, "_commit_hash", None)
            if folder.is_dir():
                files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IDENTITY_SUFFIXES)
                self._identity = f"local:{folder.resolve().name}@{files_sha256(files)}"
            elif revision:
                self._identity = f"local:{self.name}@rev:{revision}"
            else:
                self._ensure_loaded()
                self._identity = f"local:{self.name}@{_parameters_sha256(self.model)}"
        return self._identity

    @property
    def cache_path(self) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.identity.removeprefix("local:"))
        return self.cache_dir / f"local-{slug}.json"

    def _verdicts(self) -> VerdictCache:
        if self._cache is None:
            self._cache = VerdictCache(self.cache_path, CACHE_FORMAT)
        return self._cache

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """P(" yes") of each (question, answer): cached verdicts read back, the others computed and cached."""
        questions, answers = self._pairs(questions, answers)
        prompts = [judge_prompt(q, a, self.kind) for q, a in zip(questions, answers)]
        if not prompts:
            return np.zeros(0)
        cache, source = self._verdicts(), self.identity
        keys = [cache.key(source, p) for p in prompts]
        todo = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in cache))
        if todo:
            saved = time.monotonic()
            try:
                for batch, p_yes in self._p_yes(todo):
                    cache.verdicts.update((cache.key(source, p), v) for p, v in zip(batch, p_yes))
                    if time.monotonic() - saved > SAVE_EVERY_S:
                        cache.save()
                        saved = time.monotonic()
            finally:  # what was computed is kept, also when a batch fails
                cache.save()
        return np.array([cache.verdicts[k] for k in keys], dtype=float)

    # the model's P(" yes") ----------------------------------------------------------------------
    def _p_yes(self, prompts: list[str]) -> Iterator[tuple[list[str], list[float]]]:
        """(prompts, their P(" yes")) batch after batch, prompts of similar length together (less padding); a
        batch that runs out of GPU memory is halved (one warning) and tried again."""
        import torch

        self._ensure_loaded()
        seqs = [list(ids) for ids in self.tokenizer(prompts)["input_ids"]]  # each as alone: no padding here
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        lo, size = 0, self.batch_size
        while lo < len(order):
            rows = order[lo : lo + size]
            try:
                p_yes = self._forward([seqs[i] for i in rows])
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise JudgeUnavailableError(
                        f"{FLAGS[self.kind]} local:{self.name}: out of memory on {self.device} scoring one answer: "
                        "free the GPU (another process may hold its memory), put the judge on another GPU "
                        "(--device), or use a smaller judge; the verdicts so far are cached."
                    ) from None
                size = max(1, size // 2)
                log.warning("local judge %s: out of memory on %s; batch halved to %d.", self.name, self.device, size)
                torch.cuda.empty_cache()
                continue
            yield [prompts[i] for i in rows], p_yes
            lo += len(rows)

    def _forward(self, seqs: list[list[int]]) -> list[float]:
        """P(" yes") after each of `seqs`, left-padded with the positions each would have alone."""
        import torch

        from ..answering.prefix import left_pad, tokenizer_pad_id

        ids, mask, positions = left_pad(seqs, tokenizer_pad_id(self.tokenizer))  # (batch, width) each
        device = self._input_device
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if "position_ids" in self._params:
            kwargs["position_ids"] = positions.to(device)
        if "logits_to_keep" in self._params:
            kwargs["logits_to_keep"] = 1  # the lm head on the last position only, not (batch, width, vocab)
        if "use_cache" in self._params:
            kwargs["use_cache"] = False  # one pass: no key/value cache to keep
        self.n_forward += 1
        with torch.no_grad():
            logits = self.model(**kwargs).logits[:, -1]  # (batch, vocab)
        return torch.softmax(logits.float(), dim=-1)[:, self.yes_id].cpu().tolist()


def gpu_room(device: str) -> int:
    """Bytes a new allocation on `device` (cuda:N) can take: the driver's free memory and what PyTorch's
    allocator holds but does not use (the subject model's freed activations)."""
    import torch

    index = torch.device(device).index or 0
    free, _ = torch.cuda.mem_get_info(index)
    return free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)


def release_subject_first(judges) -> bool:
    """Whether the subject model must leave the GPU before `judges` load: some are local judges on a GPU,
    not loaded yet, whose weights (times HEADROOM[0], plus HEADROOM[1] for their batches and the subject's
    next answers, as slim.models.placement sizes a model) need more than the room left on their GPU."""
    from ..models.placement import HEADROOM

    need: dict[str, int] = {}
    for judge in judges:
        weights = judge.memory_need() if callable(getattr(judge, "memory_need", None)) else 0
        if weights:
            need[judge.device] = need.get(judge.device, 0) + weights
    return any(gpu_room(device) < int(n * HEADROOM[0]) + HEADROOM[1] for device, n in need.items())


def _parameters_sha256(model) -> str:
    """A short sha256 over the names, shapes, dtypes and bytes of a model's parameters and buffers."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()[:HASH_CHARS]}"
