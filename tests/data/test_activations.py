"""Batched extraction equals one-text extraction; the cache is reused and resumes."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from slim.data.activations import cached_head_activations, last_token_head_activations

TEXTS = [
    "Q: What is the capital of France ? A: Paris .",
    "Q: who was it ? A: I have no comment",
    "Q: What happens to you if you eat seeds ? A: Nothing happens",
    "yes",
    "Q: where is London ? A: in France . It was",
    "no no no",
    "Q: how ? A: yes",
]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_batched_equals_one_at_a_time(arch, tokenizer):
    model = tiny_model(arch)
    batched = last_token_head_activations(model, tokenizer, TEXTS)
    assert batched.shape == (len(TEXTS), 3, 4, 8)
    single = np.concatenate([last_token_head_activations(model, tokenizer, [t]) for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-4, rtol=0)


class CountingModel(torch.nn.Module):
    """Counts forward calls of the base model, optionally failing after `fail_after` of them."""

    def __init__(self, model, fail_after=None):
        super().__init__()
        self.inner, self.calls, self.fail_after = model, 0, fail_after
        self.config = model.config

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    @property
    def base_model(self):
        outer = self

        def run(**kw):
            outer.calls += 1
            if outer.fail_after is not None and outer.calls > outer.fail_after:
                raise KeyboardInterrupt
            return outer.inner.base_model(**kw)

        return run


def test_cache_is_reused_and_interrupted_runs_resume(tmp_path, tokenizer):
    model = tiny_model("llama")
    reference = last_token_head_activations(model, tokenizer, TEXTS)
    kw = dict(
        path=tmp_path / "tiny_toy_head_wise.npy", model_name="tiny", dataset_name="toy", batch_size=2, progress=False
    )

    flaky = CountingModel(model, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        cached_head_activations(flaky, tokenizer, TEXTS, **kw)
    manifest = json.loads((tmp_path / "tiny_toy_head_wise.json").read_text())
    assert manifest["rows_done"] == 4 and manifest["dtype"] == "float16" and manifest["rows"] == len(TEXTS)

    resumed = CountingModel(model)
    acts = cached_head_activations(resumed, tokenizer, TEXTS, **kw)
    assert resumed.calls == 2  # only the 3 rows left, in batches of 2
    assert acts.dtype == np.float16 and acts.shape == reference.shape
    np.testing.assert_allclose(acts.astype(np.float32), reference, atol=2e-3, rtol=2e-3)  # float16 storage

    again = CountingModel(model)
    cached = cached_head_activations(again, tokenizer, TEXTS, **kw)
    assert again.calls == 0
    np.testing.assert_array_equal(cached, acts)

    changed = CountingModel(model)  # other texts: the cache does not match and is rebuilt
    cached_head_activations(changed, tokenizer, TEXTS[:3], **kw)
    assert changed.calls == 2
