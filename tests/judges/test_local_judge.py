"""The local transformers judge: last position only, batches, its verdict cache, its device, the public pair,
and whether the subject model must make room for it on a GPU."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import make_bpe_tokenizer, tiny_model
from slim.judges import JudgeUnavailableError, LocalLMJudge, make_judge
from slim.judges.local import judge_device, release_subject_first

CORPUS = [
    "Q: What is the capital of France?\nA: Paris is the capital of France.\nTrue: yes",
    "Q: Do you eat seeds?\nA: Nothing happens if you eat watermelon seeds.\nHelpful: no",
    "I have no comment. The moon is made of rock. yes no yes no True: Helpful:",
] * 20
QS = ["What is the capital of France?", "Do you eat seeds?", "Why?", "Is the moon made of rock?", "Who?"]
AS = ["Paris is the capital of France, a city on the Seine.", "No.", "", "I have no comment.", "Nothing happens."]
GIB = 1 << 30


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A folder holding a tiny random Llama judge and its byte-level BPE tokenizer."""
    folder = tmp_path_factory.mktemp("judge") / "judge"
    tokenizer = make_bpe_tokenizer(CORPUS)
    tiny_model("llama", vocab_size=len(tokenizer), max_positions=256, num_layers=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def count_forward(judge: LocalLMJudge) -> list[int]:
    """Wrap the judge's model so that each forward pass records its batch size and the logits' length."""
    judge._ensure_loaded()
    real, calls = judge.model.forward, []

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs["input_ids"].shape[0], out.logits.shape[1]))
        return out

    judge.model.forward = counting
    return calls


def full_logit_scores(judge_dir, kind="truth"):
    """P(" yes") of each prompt alone from the full (1, seq, vocab) logits, no padding, no judge code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(judge_dir)
    model = AutoModelForCausalLM.from_pretrained(judge_dir, dtype=torch.float32).eval()
    yes = tokenizer.convert_tokens_to_ids("\u0120yes")  # byte-level BPE's " yes"
    suffix = {"truth": "True:", "info": "Helpful:"}[kind]
    out = []
    for q, a in zip(QS, AS):
        ids = tokenizer(f"Q: {q}\nA: {a.strip()}\n{suffix}", return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(torch.softmax(model(ids).logits[0, -1], -1)[yes].item())
    return np.array(out)


def test_last_position_scores_equal_full_logit_scores(judge_dir, tmp_path):
    judge = make_judge(f"local:{judge_dir}", "truth", device="cpu", cache_dir=tmp_path)
    calls = count_forward(judge)
    scores = judge.score(QS, AS)
    np.testing.assert_allclose(scores, full_logit_scores(judge_dir), rtol=1e-5, atol=1e-7)
    assert calls and all(width == 1 for _, width in calls)  # the lm head ran on the last position only


def test_a_model_without_logits_to_keep_is_sliced_to_the_same_scores(judge_dir, tmp_path):
    class NoKeep(torch.nn.Module):
        """A causal LM whose forward takes ids, mask and positions only."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = NoKeep(AutoModelForCausalLM.from_pretrained(judge_dir))
    judge = LocalLMJudge("org/nokeep", "truth", model=model, tokenizer=AutoTokenizer.from_pretrained(judge_dir))
    judge.cache_dir = tmp_path
    np.testing.assert_allclose(judge.score(QS, AS), full_logit_scores(judge_dir), rtol=1e-5, atol=1e-7)


def test_a_batch_scores_as_one_by_one_and_returns_in_input_order(judge_dir, tmp_path):
    one = make_judge(f"local:{judge_dir}", "info", batch_size=1, cache_dir=tmp_path / "a").score(QS, AS)
    batched = make_judge(f"local:{judge_dir}", "info", batch_size=3, cache_dir=tmp_path / "b")
    calls = count_forward(batched)
    np.testing.assert_allclose(batched.score(QS, AS), one, rtol=1e-5, atol=1e-7)
    assert [size for size, _ in calls] == [3, 2]
    np.testing.assert_allclose(full_logit_scores(judge_dir, "info"), one, rtol=1e-5, atol=1e-7)
    reversed_ = make_judge(f"local:{judge_dir}", "info", batch_size=2, cache_dir=tmp_path / "c")
    np.testing.assert_allclose(reversed_.score(QS[::-1], AS[::-1]), one[::-1], rtol=1e-5, atol=1e-7)


def test_cached_verdicts_need_no_model_and_survive_a_new_judge(judge_dir, tmp_path, monkeypatch):
    judge = make_judge(f"local:{judge_dir}", "truth", cache_dir=tmp_path)
    calls = count_forward(judge)
    first = judge.score(QS + QS[:2], AS + AS[:2])  # a repeated pair is computed once
    assert sum(size for size, _ in calls) == len(QS)
    assert judge.cache_path.parent == tmp_path and judge.cache_path.name.startswith("local-judge_sha256_")
    saved = json.loads(judge.cache_path.read_text())
    assert saved["format"] == "slim-local-judge-cache/1" and len(saved["verdicts"]) == len(QS)

    calls.clear()
    np.testing.assert_array_equal(judge.score(QS[::-1], AS[::-1]), first[: len(QS)][::-1])
    assert not calls  # the same judge: every verdict from its cache

    monkeypatch.setattr(LocalLMJudge, "_load", lambda *a: pytest.fail("all verdicts are cached: nothing to load"))
    again = make_judge(f"local:{judge_dir}", "truth", cache_dir=tmp_path)
    np.testing.assert_array_equal(again.score(QS, AS), first[: len(QS)])
    assert again.model is None and again.n_forward == 0

    monkeypatch.undo()
    fresh = make_judge(f"local:{judge_dir}", "truth", cache_dir=tmp_path)
    calls = count_forward(fresh)
    fresh.score(QS + ["Where?"], AS + ["Here."])  # one new pair: one prompt computed
    assert [size for size, _ in calls] == [1]
    other_kind = make_judge(f"local:{judge_dir}", "info", cache_dir=tmp_path)
    calls = count_forward(other_kind)
    other_kind.score(QS[:1], AS[:1])  # another prompt ("Helpful:"): not the truth judge's verdict
    assert calls


def test_a_damaged_cache_is_moved_aside_and_the_verdicts_made_again(judge_dir, tmp_path, caplog):
    judge = make_judge(f"local:{judge_dir}", "truth", cache_dir=tmp_path)
    expected = judge.score(QS, AS)
    path = judge.cache_path
    path.write_text('{"format": "slim-local-judge-cache/1", "verdicts": {"ab')  # cut short
    again = make_judge(f"local:{judge_dir}", "truth", cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="slim.judges"):
        scores = again.score(QS, AS)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert path.with_name(path.name + ".damaged").read_text().endswith('{"ab')
    assert len(json.loads(path.read_text())["verdicts"]) == len(QS)
    assert any("is damaged" in r.getMessage() and "asked again" in r.getMessage() for r in caplog.records)


def test_allenai_names_the_public_pair_by_hub_revision_without_loading(judge_dir, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read, loads = [], []

    def fake_config(self, name):
        read.append(name)
        return SimpleNamespace(_commit_hash=f"rev-of-{name.split('-')[1]}")

    def loader(real):  # the hub stands in for the tiny judge; what was asked for is recorded
        def load(name, **kwargs):
            loads.append((name, kwargs.get("revision")))
            return real(judge_dir)

        return load

    monkeypatch.setattr(LocalLMJudge, "_read_config", fake_config)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", loader(AutoTokenizer.from_pretrained))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loader(AutoModelForCausalLM.from_pretrained))
    truth = make_judge("allenai", "truth", device="cpu", cache_dir=tmp_path)
    info = make_judge(" allenai ", "info", device="cpu", cache_dir=tmp_path)
    assert read == ["allenai/truthfulqa-truth-judge-llama2-7B", "allenai/truthfulqa-info-judge-llama2-7B"]
    assert truth.identity == "local:allenai/truthfulqa-truth-judge-llama2-7B@rev:rev-of-truth"
    assert info.identity == "local:allenai/truthfulqa-info-judge-llama2-7B@rev:rev-of-info"
    assert not loads and truth.model is None and info.model is None  # named without loading any weights

    info.score(QS[:1], AS[:1])  # the weights of the revision its identity names
    assert loads == [("allenai/truthfulqa-info-judge-llama2-7B", "rev-of-info")] * 2
    assert info.cache_path.name == "local-allenai_truthfulqa-info-judge-llama2-7B_rev_rev-of-info.json"
    assert info.identity == "local:allenai/truthfulqa-info-judge-llama2-7B@rev:rev-of-info"


def test_a_judge_that_cannot_load_stops_at_once_naming_its_flag(tmp_path):
    for kind, flag in (("truth", "--judge_name"), ("info", "--info_name")):
        with pytest.raises(JudgeUnavailableError) as info:
            make_judge(f"local:{tmp_path / 'nothing-here'}", kind)
        message = str(info.value)
        assert message.startswith(f"{flag} local:") and "\n" not in message and "folder with a causal LM" in message


def test_device_auto_and_loading_straight_onto_a_gpu(judge_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert judge_device("auto") == "cpu" and judge_device(None) == "cpu"
    cpu = make_judge(f"local:{judge_dir}", "truth", device="auto", cache_dir=tmp_path)
    assert cpu.device == "cpu" and cpu.batch_size == 8 and cpu.memory_need() == 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert judge_device("auto") == "cuda:0" and judge_device(torch.device("cuda", 1)) == "cuda:1"
    assert judge_device(1) == "cuda:1"
    gpu = make_judge(f"local:{judge_dir}", "truth", device="auto", cache_dir=tmp_path)
    assert gpu.device == "cuda:0" and gpu.batch_size == 32
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(judge_dir)
    assert gpu.memory_need() == sum(p.numel() for p in model.parameters()) * 2  # fp16 weights: 2 bytes each

    loads = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):  # what a GPU load asks for; the weights stay on the CPU here
        loads.append(kwargs)
        return real(name, dtype=torch.float32)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    gpu.score(QS[:1], AS[:1])
    assert loads == [{"dtype": torch.float16, "trust_remote_code": False, "device_map": {"": "cuda:0"}}]
    assert gpu.memory_need() == 0  # loaded: no more room to find

    config = json.loads((judge_dir / "config.json").read_text())
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    for f in judge_dir.iterdir():
        (bf16 / f.name).write_bytes(f.read_bytes())
    (bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    make_judge(f"local:{bf16}", "truth", device="cuda:1", cache_dir=tmp_path).score(QS[:1], AS[:1])
    assert loads[-1] == {"dtype": torch.bfloat16, "trust_remote_code": False, "device_map": {"": "cuda:1"}}


def test_the_subject_model_goes_first_only_when_the_judges_do_not_fit(monkeypatch):
    def judge(device, weights):
        return SimpleNamespace(device=device, memory_need=lambda: weights)

    free, reserved, allocated = {0: 40 * GIB, 1: 10 * GIB}, {0: 0, 1: 0}, {0: 0, 1: 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: reserved[i])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: allocated[i])
    pair = [judge("cuda:0", 13 * GIB), judge("cuda:0", 13 * GIB)]  # two 7B judges in fp16
    assert not release_subject_first(pair)  # 26 GiB * 1.2 + 2 GiB = 33.2 GiB <= 40 GiB free
    free[0] = 30 * GIB
    assert release_subject_first(pair)
    reserved[0], allocated[0] = 20 * GIB, 15 * GIB  # 5 GiB PyTorch holds unused count as room
    assert not release_subject_first(pair)
    assert release_subject_first([judge("cuda:1", 13 * GIB)])  # 17.6 GiB > 10 GiB free on GPU 1
    assert not release_subject_first([judge("cuda:1", 6 * GIB)])  # 9.2 GiB

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: pytest.fail("no GPU judge: no memory to ask"))
    assert not release_subject_first([judge("cpu", 0), judge("cuda:0", 0), object()])  # CPU, loaded, not local


def test_a_batch_out_of_gpu_memory_is_halved_and_no_verdict_lost(judge_dir, tmp_path, caplog):
    expected = make_judge(f"local:{judge_dir}", "truth", batch_size=1, cache_dir=tmp_path / "a").score(QS, AS)
    judge = make_judge(f"local:{judge_dir}", "truth", batch_size=4, cache_dir=tmp_path / "b")
    judge._ensure_loaded()
    real, sizes = judge.model.forward, []

    def small_gpu(*args, **kwargs):  # room for two prompts at a time
        sizes.append(kwargs["input_ids"].shape[0])
        if sizes[-1] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    judge.model.forward = small_gpu
    with caplog.at_level(logging.WARNING, logger="slim.judges"):
        np.testing.assert_allclose(judge.score(QS, AS), expected, rtol=1e-5, atol=1e-7)
    assert sizes == [4, 2, 2, 1]  # 5 prompts: 4 at once fails, then 2 + 2 + the last one
    assert sum("batch halved to 2" in r.getMessage() for r in caplog.records) == 1

    judge.model.forward = lambda *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("simulated"))
    with pytest.raises(JudgeUnavailableError, match="out of memory on cpu scoring one answer: free the GPU"):
        judge.score(["New?"], ["Yes."])

    # a pass that fails part way keeps what it computed: the next judge reads those verdicts back
    failing = make_judge(f"local:{judge_dir}", "truth", batch_size=1, cache_dir=tmp_path / "c")
    failing._ensure_loaded()
    calls, real = [], failing.model.forward

    def fails_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a real failure, not memory")
        return real(*args, **kwargs)

    failing.model.forward = fails_third
    with pytest.raises(RuntimeError, match="a real failure"):
        failing.score(QS, AS)
    again = make_judge(f"local:{judge_dir}", "truth", batch_size=1, cache_dir=tmp_path / "c")
    assert len(again._verdicts().verdicts) == 2  # the two verdicts before the failure were saved
