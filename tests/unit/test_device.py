"""Device and dtype specs, multi-GPU block placement (with a pretend GPU count), bf16 training on the CPU."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

import fedsea
from fedsea.config import Placement
from fedsea.errors import DeviceError
from fedsea.model import device as dev
from fedsea.model.fingerprint import model_fingerprint
from fedsea.model.load import load_model
from tests.conftest import randomize_lora

TINY = {"num_layers": 6, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 512}


@pytest.fixture
def two_gpus(monkeypatch):
    """Pretend torch is a CUDA build that sees two GPUs (nothing is put on them)."""
    monkeypatch.setattr(dev, "_cuda_count", lambda: 2)
    monkeypatch.setattr(torch.version, "cuda", "12.4")


def test_devices_here_resolve_and_a_missing_gpu_says_how_to_fix_it():
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device(torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert dev.resolve_device("auto") == dev.resolve_device("auto", spread=True) == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(DeviceError, match=r"(?i)cuda") as caught:
            dev.resolve_device(spec)
        assert "--device cpu" in str(caught.value)
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"):
        dev.resolve_device("gpu")


def test_gpu_indices_are_checked_against_the_visible_count(two_gpus):
    assert dev.resolve_device("cuda") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"'cuda:3' does not exist: 2 GPU\(s\) visible \(cuda:0, cuda:1\)"):
        dev.resolve_device("cuda:3")
    # auto: one GPU for a client, all of them for the trunk server.
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    assert dev.resolve_device("auto", spread=True) == "auto"


def test_dtypes_resolve_by_name_and_auto_follows_the_device(caplog):
    assert dev.resolve_dtype("auto", "cpu") == dev.resolve_dtype(None, "cpu") == torch.float32
    assert dev.resolve_dtype("auto", torch.device("cuda", 0)) == dev.resolve_dtype("auto", "auto") == torch.bfloat16
    assert dev.resolve_dtype("bf16") == dev.resolve_dtype("bfloat16") == torch.bfloat16
    assert dev.resolve_dtype("fp32") == dev.resolve_dtype(torch.float32) == torch.float32
    with caplog.at_level(logging.WARNING, logger="fedsea.model.device"):
        assert dev.resolve_dtype("fp16", "cpu") == torch.float16  # allowed, with a warning
    assert "float16 on the CPU" in caplog.text
    with pytest.raises(ValueError, match="dtype must be auto, float32"):
        dev.resolve_dtype("int8")
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        dev.resolve_dtype(torch.float64)


def test_the_wire_dtype_defaults_to_the_models():
    assert dev.resolve_wire_dtype("auto", torch.float32) == "fp32"
    assert dev.resolve_wire_dtype(None, torch.bfloat16) == "bf16"
    assert dev.resolve_wire_dtype("auto", torch.float16) == "fp16"
    assert dev.resolve_wire_dtype("fp32", torch.bfloat16) == "fp32"  # an explicit choice stays


def test_placement_settings_check_their_specs():
    assert Placement() == Placement("auto", "auto")
    Placement("cuda:7", "bf16")  # well formed; the hardware is checked when the model loads
    with pytest.raises(ValueError, match="device must be"):
        Placement(device="cuda:")
    with pytest.raises(ValueError, match="dtype must be"):
        Placement(dtype="float64")


@pytest.mark.parametrize(
    ("sizes", "devices", "first"),
    [([10] * 8, 2, 0), ([10] * 8, 3, 30), ([10] * 3, 4, 0), ([1, 1, 1, 100], 2, 0), ([5] * 30, 4, 50), ([7], 3, 0)],
)
def test_the_block_plan_is_contiguous_balanced_and_uses_every_device(sizes, devices, first):
    plan = dev.balanced_plan(sizes, devices, first)
    assert len(plan) == len(sizes) and plan[0] == 0
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(plan))  # contiguous ranges, in order
    assert len(set(plan)) == min(devices, len(sizes))  # no GPU left empty while blocks are left
    loads = [first * (d == 0) + sum(s for s, p in zip(sizes, plan, strict=True) if p == d) for d in set(plan)]
    # Balanced: no device holds more than its share plus one block.
    assert max(loads) <= (first + sum(sizes)) / len(set(plan)) + max(sizes)


def test_the_pre_hooks_move_every_tensor_input_to_the_blocks_device():
    hook = dev._align_inputs(torch.device("meta"))
    hidden, cos, sin = torch.ones(1, 2, 4), torch.ones(2), torch.ones(2)
    args, kwargs = hook(torch.nn.Identity(), (hidden,), {"position_embeddings": (cos, sin), "cache": "kept", "m": None})
    assert args[0].device.type == "meta"
    assert [t.device.type for t in kwargs["position_embeddings"]] == ["meta", "meta"]
    assert (kwargs["cache"], kwargs["m"]) == ("kept", None)


def test_blocks_placed_over_several_devices_compute_what_one_device_does(tiny_tokenizer):
    """The multi-GPU code path with CPU 'devices': the hooks run (their moves are no-ops)."""
    placed, plain = fedsea.tiny_llama(**TINY), fedsea.tiny_llama(**TINY)
    devices = dev.place_blocks(placed, [torch.device("cpu")] * 3)
    assert len(devices) == 6 and all(len(layer._forward_pre_hooks) == 1 for layer in placed.model.layers)
    ids = tiny_tokenizer(["a hook on every block"], return_tensors="pt")["input_ids"]
    lengths = torch.tensor([ids.shape[1]])
    for model in (placed, plain):
        model.eval()
    a = fedsea.split_model(placed, 2, 1)
    b = fedsea.split_model(plain, 2, 1)
    assert torch.equal(a(ids, lengths), b(ids, lengths))
    placed.fedsea_block_devices = [torch.device("cpu")] * 2 + [torch.device("meta")] * 4  # how it reads with 2
    assert dev.describe_placement(placed) == "blocks 0-1 on cpu, 2-5 on meta, torch.float32"
    assert dev.describe_placement(plain) == "cpu, torch.float32"


def test_a_bf16_model_keeps_the_fingerprint_of_the_weights_it_was_loaded_from():
    full, half = load_model("tiny-llama"), load_model("tiny-llama", dtype="bf16", device="auto")
    assert half.dtype == torch.bfloat16 and half.device == torch.device("cpu")
    # A bfloat16 server and a float32 client of one checkpoint hold the same base model.
    assert model_fingerprint(half) == model_fingerprint(full)


def _bf16_pair():
    out = []
    for _ in range(2):
        model = dev.cast_and_place(fedsea.tiny_llama(**TINY), torch.bfloat16, torch.device("cpu"))
        split = fedsea.split_model(model, 2, 1).add_lora(fedsea.LoraSpec(r=4, alpha=8, dropout=0.0))
        randomize_lora(model, seed=1)
        out.append(split)
    return out


def test_a_bf16_split_step_lowers_the_loss_and_tracks_the_unsplit_bf16_model(tiny_tokenizer):
    """Stated tolerance: split and unsplit bf16 losses within 1% at every one of 5 steps."""
    split_side, central_side = _bf16_pair()
    lora = [p for n, p in split_side.model.named_parameters() if "lora_" in n]
    # LoRA weights are float32 on the bfloat16 base (AdamW's small steps are not rounded away).
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert split_side.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    texts = ["Review: sharp writing and warm performances.", "Dull.", "The council approved a new park."]
    batch = fedsea.make_batch([tiny_tokenizer(t)["input_ids"] for t in texts], tiny_tokenizer.pad_token_id)
    optim = fedsea.OptimConfig(lr=1e-2)
    split_trainer, central = fedsea.SplitTrainer(split_side, optim=optim), fedsea.CentralTrainer(central_side, optim)
    losses = []
    for _ in range(5):
        a, b = split_trainer.train_step(batch).loss, central.train_step(batch).loss
        assert a == pytest.approx(b, rel=1e-2)
        losses.append(a)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("regularizer", ["nopeek", "adversarial"])
def test_noise_and_privacy_regularizers_train_a_bf16_head(tiny_tokenizer, regularizer):
    from fedsea.privacy.regularizers import make_head_regularizer

    split, _ = _bf16_pair()
    noise = fedsea.NoiseConfig(sigma=0.5, clip_norm=2.0, seed=1)
    reg = make_head_regularizer(regularizer, 1.0, split.head.embed_tokens.weight.detach(), noise)
    trainer = fedsea.SplitTrainer(
        split, noise=noise, grad_noise=fedsea.NoiseConfig(sigma=0.01, seed=2), head_regularizer=reg
    )
    batch = fedsea.make_batch(
        [tiny_tokenizer(t)["input_ids"] for t in ["hello there", "a b c"]], tiny_tokenizer.pad_token_id
    )
    assert all(torch.isfinite(torch.tensor(trainer.train_step(batch).loss)) for _ in range(2))
