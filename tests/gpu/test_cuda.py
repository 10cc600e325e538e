"""On CUDA: random weights equal the CPU's bit for bit, the split equals the unsplit model
(float32 to 1e-4 of the logits' scale; bfloat16 as close to float32 as Hugging Face's own
bfloat16 run is, within 2x + 1e-3 of scale), and a CUDA server serves a CPU client."""

from __future__ import annotations

import os

import pytest
import torch

import fedsea
from fedsea.model.fingerprint import model_fingerprint, weights_fingerprint
from fedsea.model.load import load_model
from fedsea.model.synthetic import build_random_model, fill_hashed_, parse_random_source
from tests.conftest import assert_close_to_scale, randomize_lora

pytestmark = pytest.mark.gpu

# Overridable for a dry run of these tests' code on the CPU (scripts/gpu_check.sh --dry-run).
CUDA = torch.device(os.environ.get("FEDSEA_GPU_TEST_DEVICE", "cuda"))
# Mixed lengths (left padding) over a real shape, cut to a few blocks to stay fast.
SHAPE = os.environ.get("FEDSEA_GPU_TEST_SHAPE", "random:llama-3-8b?layers=4")


def _batch(vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([64, 17, 40])
    ids = torch.randint(3, vocab, (3, 64), generator=gen)
    return ids.to(device), lengths.to(device)


@pytest.mark.parametrize("source", ["random:llama-tiny?seed=5", "random:qwen2-tiny"])
def test_random_weights_on_cuda_equal_the_cpu_build(source):
    spec = parse_random_source(source)
    for dtype in (torch.float32, torch.bfloat16):
        cpu = dict(build_random_model(spec, dtype, "cpu").named_parameters())
        gpu = dict(build_random_model(spec, dtype, CUDA).named_parameters())
        assert all(torch.equal(cpu[k], gpu[k].cpu()) for k in cpu)


def test_a_real_size_tensor_fills_identically_on_both_devices():
    cpu, gpu = (
        torch.empty(11008, 4096, dtype=torch.bfloat16),
        torch.empty(11008, 4096, dtype=torch.bfloat16, device=CUDA),
    )
    fill_hashed_(cpu, "model.layers.0.mlp.gate_proj.weight", 0, 0.02)
    fill_hashed_(gpu, "model.layers.0.mlp.gate_proj.weight", 0, 0.02, slice_size=1 << 20)
    assert torch.equal(cpu, gpu.cpu())


def test_fingerprints_do_not_depend_on_the_device():
    source = "random:llama-tiny?layers=2"
    assert model_fingerprint(load_model(source, device=CUDA)) == model_fingerprint(load_model(source))
    tiny = fedsea.tiny_llama()
    assert weights_fingerprint(tiny.to(CUDA)) == weights_fingerprint(fedsea.tiny_llama())


def test_float32_split_equals_the_unsplit_model_on_cuda():
    model = load_model(SHAPE, device=CUDA)
    ids, lengths = _batch(model.config.vocab_size, CUDA)
    split = fedsea.split_model(model, head_layers=1, tail_layers=2)
    with torch.no_grad():
        assert_close_to_scale(split(ids, lengths), fedsea.central_forward(model, ids, lengths))


def test_bfloat16_split_is_as_close_to_float32_as_hugging_face_bfloat16():
    reference_model = load_model(SHAPE, device=CUDA)
    ids, lengths = _batch(reference_model.config.vocab_size, CUDA)
    with torch.no_grad():
        reference = fedsea.central_forward(reference_model, ids, lengths).float()
    del reference_model
    model = load_model(SHAPE, dtype="bfloat16", device=CUDA)
    mask = torch.arange(64, device=CUDA)[None, :] >= (64 - lengths)[:, None]  # real tokens only
    with torch.no_grad():
        hf = fedsea.central_forward(model, ids, lengths).float()
        split = fedsea.split_model(model, head_layers=1, tail_layers=2)(ids, lengths).float()
    scale = float(reference[mask].abs().max())
    hf_error = float((hf - reference)[mask].abs().max())
    split_error = float((split - reference)[mask].abs().max())
    assert split_error <= 2 * hf_error + 1e-3 * scale, (split_error, hf_error, scale)
    assert split_error <= 5e-2 * scale, (split_error, scale)


def test_a_cuda_server_trains_with_a_cpu_client_as_in_process_training_does(tiny_tokenizer):
    from fedsea.client.split_client import SplitClient
    from fedsea.server.app import ServerThread, TrunkServer
    from fedsea.server.trunk import TrunkHost
    from tests.integration.conftest import tiny_batch

    source = "random:llama-tiny?seed=2"
    thread = ServerThread(TrunkServer(TrunkHost(load_model(source, device=CUDA))))
    address = f"localhost:{thread.start()}"
    optim = fedsea.OptimConfig(lr=1e-2)

    def split() -> fedsea.SplitModel:
        made = fedsea.split_model(load_model(source), 1, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
        randomize_lora(made.model, seed=1)
        return made

    batch = tiny_batch(tiny_tokenizer)
    try:
        in_process = fedsea.SplitTrainer(split(), optim=optim)  # all on the CPU
        with SplitClient(address, split(), optim=optim) as client:  # the trunk on CUDA
            for _ in range(3):
                remote_loss, local_loss = client.train_step(batch).loss, in_process.train_step(batch).loss
                assert remote_loss == pytest.approx(local_loss, rel=1e-4)
    finally:
        thread.stop()


def test_a_cuda_trunk_sizes_its_auto_memory_budgets_from_the_gpus_free_memory():
    from fedsea.config import ServerLimits
    from fedsea.server.trunk import TrunkHost

    model = load_model("random:llama-tiny?layers=2", device=CUDA)
    host = TrunkHost(model, ServerLimits())
    if CUDA.type == "cuda":
        free, total = torch.cuda.mem_get_info(CUDA)
        # Sized from what the GPU has free (not the host's RAM): within what was free then and now.
        assert host.limits.max_pending_bytes <= int(total * 2 / 3)
        assert abs(host.limits.max_pending_bytes - int(free * 2 / 3)) < 256 * 1024**2
    assert host.limits.is_sized


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_split_generation_with_cuda_on_both_sides_equals_hugging_face_generate(dtype, tiny_tokenizer):
    """The decode path on a GPU (attention kernels, checks on the device, pinned copies): a padded
    and an unpadded batch, greedy, token for token as ``generate`` on the same model and adapters."""
    from fedsea.model.attention import attention_kernels
    from fedsea.server.app import ServerThread, TrunkServer
    from fedsea.server.trunk import TrunkHost

    source = "random:llama-tiny?seed=3"
    thread = ServerThread(TrunkServer(TrunkHost(load_model(source, dtype=dtype, device=CUDA))))
    port = thread.start()
    split = fedsea.split_model(load_model(source, dtype=dtype, device=CUDA), 1, 1)
    split.add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=1, scale=0.2)
    padded = tiny_tokenizer(["The movie was a delight from start", "Hi"], return_tensors="pt", padding=True)
    ids = torch.randint(3, split.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    unpadded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    try:
        with fedsea.SplitClient(f"localhost:{port}", split, tokenizer=tiny_tokenizer) as client:
            for enc in (padded, unpadded):
                ids, mask = enc["input_ids"].to(CUDA), enc["attention_mask"].to(CUDA)
                ours = client.generate_ids(ids, mask.sum(dim=1), max_new_tokens=10, eos_token_id=())
                with torch.no_grad(), attention_kernels(CUDA):
                    theirs = split.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=10,
                        do_sample=False,
                        pad_token_id=tiny_tokenizer.pad_token_id,
                        eos_token_id=None,
                    )
                assert ours.token_ids == theirs[:, ids.shape[1] :].tolist(), dtype
    finally:
        thread.stop()
