"""A joint trunk pass over several streams equals each stream's own pass (issue 17, item 2).

Each stream has its own session (its own LoRA adapter on the shared blocks, random and with a
non-zero B), its own KV cache and its own prompt length; the joint pass must give every stream
the hidden states its single-session pass gives (fp32 tolerance) and leave its cache the same.
"""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.config import LoraSpec, OptimConfig
from fedsea.model.joint import JointInput, joint_forward
from fedsea.model.tiny_families import TINY_FAMILIES, tiny_family_model
from fedsea.server.trunk import Session, SessionSpec, TrunkHost
from tests.conftest import assert_close_to_scale

# Different ranks and targets: the pass must add each stream's own adapter, and only where it has one.
SPECS = [
    LoraSpec(r=4, alpha=8.0, dropout=0.1),
    LoraSpec(r=2, alpha=4.0, dropout=0.0, target_modules=("q_proj", "v_proj")),
    LoraSpec(r=8, alpha=16.0, dropout=0.05, target_modules=("o_proj", "down_proj", "up_proj")),
]


def _host(model: torch.nn.Module) -> tuple[TrunkHost, list[Session]]:
    host = TrunkHost(model)
    sessions = []
    for i, spec in enumerate(SPECS):
        session = host.open_session(f"client-{i}", host.fingerprint, SessionSpec(1, 1, spec, OptimConfig(), 0, seed=i))
        state = host.get_adapter(session.owner, session.id)
        gen = torch.Generator().manual_seed(100 + i)
        host.put_adapter(
            session.owner, session.id, {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in state.items()}
        )
        sessions.append(session)
    return host, sessions


def _alone(host: TrunkHost, session: Session, hidden: torch.Tensor, lengths: torch.Tensor, cache) -> torch.Tensor:
    with host.computing(session, training=False), torch.no_grad():
        return session.trunk(hidden, lengths, cache=cache)


def _compare(model: torch.nn.Module) -> None:
    host, sessions = _host(model)
    d = host.hidden_size
    gen = torch.Generator().manual_seed(7)
    # Stream i: batch rows and prompt lengths of its own (stream 1 left-padded), two decode steps.
    prompts = [(1, 9, [9]), (2, 5, [5, 3]), (1, 14, [14])]
    hiddens = [torch.randn(b, n, d, generator=gen) for b, n, _ in prompts]
    alone_caches = [s.trunk.new_cache() for s in sessions]
    joint_caches = [s.trunk.new_cache() for s in sessions]
    lengths = [torch.tensor(lens) for _, _, lens in prompts]
    # Step 0 (prefills of different lengths) and two decode steps, all joint; the references alone.
    for step in range(3):
        if step:
            hiddens = [torch.randn(b, 1, d, generator=gen) for b, _, _ in prompts]
            lengths = [lens + 1 for lens in lengths]
        want = [
            _alone(host, s, h, lens, c) for s, h, lens, c in zip(sessions, hiddens, lengths, alone_caches, strict=True)
        ]
        inputs = [
            JointInput(h, lens, c, s.adapter_name)
            for s, h, lens, c in zip(sessions, hiddens, lengths, joint_caches, strict=True)
        ]
        with host.computing(sessions[0], training=False), torch.no_grad():
            got = joint_forward(sessions[0].trunk, inputs)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            assert_close_to_scale(g, w, rel=1e-5)
    for a, j in zip(alone_caches, joint_caches, strict=True):
        for la, lj in zip(a.layers, j.layers, strict=True):
            if getattr(la, "keys", None) is not None and la.keys is not None and la.keys.numel():
                assert_close_to_scale(lj.keys, la.keys, rel=1e-5)
                assert_close_to_scale(lj.values, la.values, rel=1e-5)
    # The adapters matter: without them (base weights only) the first stream's output differs.
    base = [JointInput(torch.ones(1, 1, d), torch.tensor([1]), None, None)]
    mine = [JointInput(torch.ones(1, 1, d), torch.tensor([1]), None, sessions[0].adapter_name)]
    with host.computing(sessions[0], training=False), torch.no_grad():
        assert not torch.allclose(joint_forward(sessions[0].trunk, base)[0], joint_forward(sessions[0].trunk, mine)[0])


def test_joint_pass_equals_separate_passes_with_different_adapters_and_lengths():
    _compare(fedsea.tiny_llama(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512))


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "llama"])
def test_joint_pass_equals_separate_passes_in_every_family(family):
    _compare(tiny_family_model(family))


def test_joint_pass_restores_the_model():
    host, sessions = _host(fedsea.tiny_llama(num_layers=4, hidden_size=64, num_heads=4, vocab_size=512))
    config = host.model.config
    before = config._attn_implementation
    hidden = torch.randn(1, 3, host.hidden_size)
    with host.computing(sessions[0], training=False), torch.no_grad():
        want = sessions[0].trunk(hidden, torch.tensor([3]))
        joint_forward(sessions[0].trunk, [JointInput(hidden, torch.tensor([3]), None, sessions[1].adapter_name)])
        # Afterwards the single-session forward is untouched: same attention, same active adapter.
        assert config._attn_implementation == before
        assert torch.equal(sessions[0].trunk(hidden, torch.tensor([3])), want)


def test_a_sessions_output_does_not_depend_on_another_sessions_targets():
    # Found while building the joint pass: a session's forward switched on its adapter only in the
    # layers its own targets made, so a layer only another session targets (up_proj, down_proj)
    # kept that session's adapter active and leaked it into this session's output.
    host = TrunkHost(fedsea.tiny_llama(num_layers=4, hidden_size=64, num_heads=4, vocab_size=512))
    first = host.open_session("a", host.fingerprint, SessionSpec(1, 1, SPECS[1], OptimConfig(), 0, seed=0))
    hidden, lengths = torch.randn(2, 5, host.hidden_size), torch.tensor([5, 4])
    before = host.forward("a", first.id, 0, hidden, lengths)
    other = host.open_session("b", host.fingerprint, SessionSpec(1, 1, SPECS[2], OptimConfig(), 0, seed=1))
    state = host.get_adapter("b", other.id)
    host.put_adapter("b", other.id, {k: torch.full_like(v, 0.3) for k, v in state.items()})
    host.forward("b", other.id, 0, hidden, lengths)  # the other session computes: its adapter is active
    after = host.forward("a", first.id, 0, hidden, lengths)  # a resend of step 0
    assert torch.equal(after, before)


def test_joint_pass_without_caches_equals_separate_passes():
    # Naive streams (no cache, the whole sequence each step), left-padded rows of several lengths.
    host, sessions = _host(fedsea.tiny_llama(num_layers=4, hidden_size=64, num_heads=4, vocab_size=512))
    gen = torch.Generator().manual_seed(3)
    shapes = [(2, 7, [7, 4]), (1, 3, [3]), (3, 5, [5, 5, 1])]
    hiddens = [torch.randn(b, n, host.hidden_size, generator=gen) for b, n, _ in shapes]
    lengths = [torch.tensor(lens) for _, _, lens in shapes]
    want = [_alone(host, s, h, lens, None) for s, h, lens in zip(sessions, hiddens, lengths, strict=True)]
    inputs = [JointInput(h, lens, None, s.adapter_name) for s, h, lens in zip(sessions, hiddens, lengths, strict=True)]
    with host.computing(sessions[0], training=False), torch.no_grad():
        got = joint_forward(sessions[0].trunk, inputs)
    for g, w, (_, _, lens) in zip(got, want, shapes, strict=True):
        for row, n in enumerate(lens):  # padded slots are never read: compare the real tokens
            assert_close_to_scale(g[row, -n:], w[row, -n:], rel=1e-5)
