"""The self-speculative bridge drafter: exact output, drafts built right on the caches, training, files."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.errors import InvalidInputError
from fedsea.model.split import Tail
from fedsea.training import CutTraffic, GenerationConfig, LocalStepper, generate
from fedsea.training.bridge import Bridge, load_bridge, read_bridge_meta, save_bridge
from fedsea.training.bridge_drafter import BridgeDrafter
from fedsea.training.bridge_train import agreement, token_windows, train_bridge
from fedsea.training.decoder import SplitDecoder
from tests.conftest import randomize_lora

TINY = {"num_layers": 6, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 512}
PROMPT = "The movie was a delight from start to finish, a delight"


def _split(seed: int = 1) -> fedsea.SplitModel:
    split = fedsea.split_model(fedsea.tiny_llama(**TINY), 2, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=seed, scale=0.2)
    return split


def _bridge(split: fedsea.SplitModel, seed: int = 0) -> Bridge:
    torch.manual_seed(seed)
    bridge = Bridge(split.model, split.head_layers, split.tail_layers)  # random weights: other drafts
    return bridge.eval()


def _run(split, tokenizer, traffic=None, **kw):
    enc = tokenizer([PROMPT], return_tensors="pt")
    stepper = LocalStepper(split.trunk, traffic=traffic)
    return generate(split, stepper, enc["input_ids"], enc["attention_mask"].sum(1), GenerationConfig(**kw), tokenizer)


@pytest.mark.parametrize("make", ["trunk-copy", "random"])
def test_greedy_speculative_with_a_bridge_equals_plain_split_and_hf(tiny_tokenizer, make):
    split = _split()
    plain = _run(split, tiny_tokenizer, max_new_tokens=24, eos_token_id=())
    enc = tiny_tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        hf = split.model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert plain.token_ids[0] == hf[0, enc["input_ids"].shape[1] :].tolist()
    bridge = Bridge.from_model(split.model, 2, 1) if make == "trunk-copy" else _bridge(split)
    for k in (1, 4):
        traffic = CutTraffic()
        drafter = BridgeDrafter(bridge, split)
        spec = _run(split, tiny_tokenizer, traffic, max_new_tokens=24, eos_token_id=(), speculative=drafter,
                    num_draft_tokens=k)  # fmt: skip
        assert spec.token_ids == plain.token_ids, k
        assert traffic.messages // 2 <= 24, k


def test_a_draft_is_the_bridge_on_the_real_trunk_outputs_and_the_caches_are_restored(tiny_tokenizer):
    """The cached drafter proposes what the bridge gives when run from scratch on the real states."""
    split = _split(seed=4)
    bridge = _bridge(split, seed=3)
    ids = tiny_tokenizer([PROMPT], return_tensors="pt")["input_ids"]  # (1, n)
    n = ids.shape[1]
    decoder = SplitDecoder(split, LocalStepper(split.trunk), ids, torch.tensor([n]))
    drafter = BridgeDrafter(bridge, split)
    drafter.attach(decoder)
    first = int(decoder.logits()[0, -1].argmax())
    drafter.propose([*ids[0].tolist(), first], 3, lambda prefix, logits: logits, None)  # takes in the prefill
    # A step that verifies two tokens, then rewinds one: the drafter must use the kept slot only.
    decoder.feed(torch.tensor([[first, 7]]))
    decoder.logits(keep=2)
    decoder.rewind(n + 1)
    token = 11  # the next token, not yet fed
    seq = [*ids[0].tolist(), first, token]
    draft = drafter.propose(seq, 2, lambda prefix, logits: logits, None).tokens
    assert decoder.caches is not None
    assert [c.get_seq_length(p.start) for c, p in zip(decoder.caches, (split.head, split.tail), strict=True)] == [
        n + 1, n + 1]  # fmt: skip
    assert drafter.cache.get_seq_length(0) == n + 1
    # From scratch: the real trunk outputs of slots [0, n + 1), the bridge's guesses after them.
    with torch.no_grad():
        full = torch.tensor([seq])  # (1, n + 2)
        states = split.model(full, output_hidden_states=True).hidden_states
        h, f = states[2], states[6 - 1]  # h_p and h_{L-q}: (1, n + 2, d)
        prev = torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], dim=1)
        guess = bridge(h, prev, torch.arange(n + 2)[None])[:, -1:]  # (1, 1, d): the guess at slot n + 1
        tail = Tail(split.model, 1)
        expected = int(tail(torch.cat([f[:, :-1], guess], dim=1), torch.tensor([n + 2]))[0, -1].argmax())
        # The second draft: its own token through the head, the first guess as its predecessor.
        full2 = torch.tensor([[*seq, expected]])
        h2 = split.model(full2, output_hidden_states=True).hidden_states[2][:, -1:]
        hs = torch.cat([h, h2], dim=1)
        prevs = torch.cat([prev, guess], dim=1)
        guess2 = bridge(hs, prevs, torch.arange(n + 3)[None])[:, -1:]
        expected2 = int(tail(torch.cat([f[:, :-1], guess, guess2], dim=1), torch.tensor([n + 3]))[0, -1].argmax())
    assert draft == [expected, expected2]


def test_training_raises_agreement_and_the_file_round_trips(tiny_tokenizer, tmp_path):
    model = fedsea.tiny_llama(**TINY)
    texts = [f"the cat {i} sat on the mat and the dog {i % 7} ran after it, again and again" for i in range(40)]
    windows = token_windows(tiny_tokenizer, texts, 32)
    bridge, info = train_bridge(model, 2, 1, windows[4:], windows[:4], steps=60, batch_size=4, lr=3e-3,
                                progress=False)  # fmt: skip
    assert info["loss_last"] < 0.7 * info["loss_first"], info
    assert info["agreement_after"] > info["agreement_before"] + 0.1, info
    # The drafts' sub-vocabulary: the tokens the model chose on the training text, kept in the file.
    assert bridge.draft_vocab is not None and 0 < info["draft_vocab"] == bridge.draft_vocab.numel() < 512
    path = save_bridge(bridge, tmp_path / "b.safetensors", info)
    assert read_bridge_meta(path)["head_layers"] == 2
    loaded = load_bridge(path, model, 2, 1)
    assert loaded.draft_vocab is not None and torch.equal(loaded.draft_vocab, bridge.draft_vocab)
    tail = Tail(model, 1)
    assert agreement(model, loaded, tail, windows[:4], 4) == info["agreement_after"]
    with pytest.raises(InvalidInputError, match=r"cut \(p, q\) = \(2, 1\).*fedsea bridge train"):
        load_bridge(path, model, 3, 1)
    other = fedsea.tiny_llama(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)
    with pytest.raises(InvalidInputError, match="6 blocks of width 64"):
        load_bridge(path, other, 2, 1)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(InvalidInputError, match="not a safetensors file"):
        read_bridge_meta(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="fedsea bridge train"):
        read_bridge_meta(tmp_path / "missing.safetensors")


def test_bridge_by_path_in_the_generation_config(tiny_tokenizer, tmp_path):
    split = _split(seed=5)
    path = save_bridge(Bridge.from_model(split.model, 2, 1), tmp_path / "b.safetensors")
    plain = _run(split, tiny_tokenizer, max_new_tokens=12, eos_token_id=())
    spec = _run(split, tiny_tokenizer, max_new_tokens=12, eos_token_id=(), speculative=f"bridge:{path}")
    assert spec.token_ids == plain.token_ids
    sampled = _run(split, tiny_tokenizer, max_new_tokens=12, eos_token_id=(), speculative=f"bridge:{path}",
                   do_sample=True, seed=3)  # fmt: skip
    assert len(sampled.token_ids[0]) == 12
    with pytest.raises(InvalidInputError, match="cut"):
        wrong = fedsea.split_model(split.model, 3, 1)
        _run(wrong, tiny_tokenizer, max_new_tokens=4, speculative=f"bridge:{path}")


def test_a_draft_vocabulary_limits_the_drafts_not_the_output(tiny_tokenizer):
    split = _split(seed=6)
    bridge = Bridge.from_model(split.model, 2, 1)
    vocab = torch.arange(0, 512, 3)  # every third id
    bridge.draft_vocab = vocab
    drafter = BridgeDrafter(bridge, split)
    assert drafter.rows is not None and drafter.rows.shape == (vocab.numel(), 64)
    proposed: list[int] = []
    original = drafter.propose

    def spy(*args, **kwargs):
        draft = original(*args, **kwargs)
        proposed.extend(draft.tokens)
        return draft

    drafter.propose = spy  # type: ignore[method-assign]
    plain = _run(split, tiny_tokenizer, max_new_tokens=16, eos_token_id=())
    spec = _run(split, tiny_tokenizer, max_new_tokens=16, eos_token_id=(), speculative=drafter, num_draft_tokens=3)
    assert spec.token_ids == plain.token_ids
    assert proposed and all(t % 3 == 0 for t in proposed), proposed
    assert BridgeDrafter(Bridge.from_model(split.model, 2, 1), split).rows is None  # no vocabulary: the whole head
