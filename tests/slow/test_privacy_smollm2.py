"""The attack grid on the real SmolLM2 (p = 1, two sigmas, a few hundred victim tokens): a smoke test.

Auxiliary (attacker) text: XSum validation documents; victim text: XSum test summaries.
Measured once on this machine (4,800 attacker tokens, 12 victims, 24 tokens each): at
sigma = 0 the probe recovered 93% of tokens and BiSR 99.6% (11 of 12 summaries exactly);
at sigma = 4, 45% and 68%, with the base model's perplexity at 51,000 (131 at sigma 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedsea.experiments.attack_grid import GridConfig, run_attack_grid
from fedsea.privacy.attacks import TrainConfig

pytestmark = pytest.mark.slow

XSUM = Path(os.environ.get("FEDSEA_DATA", Path(__file__).resolve().parents[3] / "shared" / "datasets")) / "xsum"


def _field(name: str, key: str, n: int) -> list[str]:
    path = XSUM / name
    assert path.is_file(), f"the shared evaluation data is missing: {path} (it sits beside the repository)"
    with path.open() as f:
        return [json.loads(line)[key] for _, line in zip(range(n), f, strict=False)]


def test_attacks_on_smollm2_recover_clean_h1_and_lose_ground_under_noise(smollm2, smollm2_tokenizer, tmp_path):
    aux = _field("validation.jsonl", "document", 200)
    victim = _field("test.jsonl", "summary", 8)
    config = GridConfig(
        sigmas=(0.0, 4.0),
        head_layers=(1,),
        attacks=("probe", "bisr"),
        max_tokens=24,
        train=TrainConfig(epochs=4, width=512, batch_size=32),
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: small ops, one thread
    try:
        rows = run_attack_grid(smollm2, smollm2_tokenizer, aux, victim, config, tmp_path)
    finally:
        torch.set_num_threads(before)
    acc = {(r.sigma, r.attack): r.token_accuracy for r in rows}
    assert acc[(0.0, "bisr")] > 0.9 and acc[(0.0, "probe")] > 0.7, acc
    assert acc[(4.0, "bisr")] < acc[(0.0, "bisr")] and acc[(4.0, "probe")] < acc[(0.0, "probe")], acc
    ppl = {r.sigma: r.utility for r in rows}
    assert ppl[0.0] < 1000 < ppl[4.0]
    assert (tmp_path / "privacy_utility.png").is_file()


def test_public_calibration_text_gives_h_p_the_scale_of_real_text(smollm2, smollm2_tokenizer):
    """The relative noise default is measured on fedsea's public text: it must scale like real text."""
    import fedsea
    from fedsea.privacy.calibration import public_rms

    aux = _field("validation.jsonl", "document", 200)
    for p in (1, 2, 4):
        head = fedsea.split_model(smollm2, p, 1).head
        public, xsum = public_rms(head, smollm2_tokenizer), public_rms(head, smollm2_tokenizer, texts=aux)
        assert public == pytest.approx(xsum, rel=0.05), p  # measured: within 3% at p = 1, 2, 3, 4, 6
