"""Split generation over gRPC: exactness against Hugging Face, sampling, resources, concurrency."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

import fedsea
from fedsea.client.generation import GenerationConfig, LocalStepper, generate
from fedsea.config import ServerLimits
from fedsea.errors import ProtocolError, RemoteError
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.auth import TokenStore
from tests.conftest import randomize_lora
from tests.integration.conftest import TINY, tiny_batch

PROMPTS = ["The movie was a delight from start", "Hi", "Question: is the sky blue on a clear day?"]


def _split(seed: int = 1, p: int = 2, q: int = 2) -> fedsea.SplitModel:
    split = fedsea.split_model(fedsea.tiny_llama(**TINY), p, q).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=seed, scale=0.2)
    return split


def _encode(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc, enc["attention_mask"].sum(dim=1)


def _hf(model, enc, new, tokenizer, **kw):
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kw)
    return out[:, enc["input_ids"].shape[1] :].tolist()


def _server_stats(client: fedsea.SplitClient) -> pb.StatsResponse:
    assert client.connection is not None
    return client.connection.stub.GetStats(pb.StatsRequest(), metadata=client.connection.metadata)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3"])
def test_greedy_over_grpc_equals_hf_generate_with_the_same_adapters(server, tiny_tokenizer, prompts):
    split = _split()
    enc, lengths = _encode(tiny_tokenizer, prompts)
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
        ours = client.generate_ids(enc["input_ids"], lengths, max_new_tokens=16, eos_token_id=())
        naive = client.generate_ids(enc["input_ids"], lengths, max_new_tokens=16, eos_token_id=(), use_cache=False)
    theirs = _hf(split.model, enc, 16, tiny_tokenizer, eos_token_id=None)  # the unsplit model, LoRA included
    assert ours.token_ids == theirs
    assert naive.token_ids == theirs
    # The adapters matter: the base model says something else.
    assert _hf(fedsea.tiny_llama(**TINY), enc, 16, tiny_tokenizer, eos_token_id=None) != theirs


def test_generation_between_training_steps_uses_eval_mode(server, tiny_tokenizer):
    """The server switches its shared blocks between training (dropout on) and inference
    (dropout off) only when needed; with LoRA dropout 0.5 any slip shows up as other tokens."""
    split = fedsea.split_model(fedsea.tiny_llama(**TINY), 2, 2).add_lora(fedsea.LoraSpec(r=4, dropout=0.5))
    randomize_lora(split.model, seed=5, scale=0.2)
    enc, lengths = _encode(tiny_tokenizer, PROMPTS)
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
        for _ in range(2):
            client.train_step(tiny_batch(tiny_tokenizer))
            first = client.generate_ids(enc["input_ids"], lengths, max_new_tokens=12, eos_token_id=())
            second = client.generate_ids(enc["input_ids"], lengths, max_new_tokens=12, eos_token_id=())
            client.sync_trunk_adapter()  # the trained trunk adapter, into the local blocks
            split.model.eval()
            assert first.token_ids == second.token_ids == _hf(split.model, enc, 12, tiny_tokenizer, eos_token_id=None)


def test_eos_ends_rows_early_and_matches_hf(server, tiny_tokenizer):
    split = _split()
    enc, lengths = _encode(tiny_tokenizer, PROMPTS)
    free = _hf(split.model, enc, 12, tiny_tokenizer, eos_token_id=None)
    eos = free[1][2]  # make row 1 end at its third token
    theirs = [
        row[: row.index(eos) + 1] if eos in row else row
        for row in _hf(split.model, enc, 12, tiny_tokenizer, eos_token_id=eos)
    ]
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
        out = client.generate_ids(enc["input_ids"], lengths, max_new_tokens=12, eos_token_id=eos)
        steps = client.stats()["rpcs"]["generate"]
    assert out.token_ids == theirs
    assert out.finish_reasons[1] == "eos" and len(out.token_ids[1]) == free[1].index(eos) + 1 <= 3
    # After row 1 finished it stopped costing bytes: the decode steps shrank.
    longest = max(len(t) for t in out.token_ids)
    full_rows = 2 * (len(PROMPTS) * 64 * 4) * (longest - 1)
    assert steps["bytes_sent"] + steps["bytes_received"] < full_rows + 2 * enc["input_ids"].numel() * 64 * 4


def test_seeded_sampling_is_reproducible_and_matches_in_process(server, tiny_tokenizer):
    split = _split()
    enc, lengths = _encode(tiny_tokenizer, PROMPTS)
    config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
        a = client.generate_ids(enc["input_ids"], lengths, config)
        b = client.generate_ids(enc["input_ids"], lengths, config)
        c = client.generate_ids(enc["input_ids"], lengths, config, seed=8)
    local = generate(split, LocalStepper(split.trunk), enc["input_ids"], lengths, config)
    assert a.token_ids == b.token_ids == local.token_ids
    assert a.token_ids != c.token_ids


def test_stop_strings_and_streaming(server, tiny_tokenizer):
    split = _split()
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
        full = client.generate(["Hello there"], max_new_tokens=20, eos_token_id=(), chat=False)[0]
        stop = full[3:5]
        cut = client.generate(["Hello there"], max_new_tokens=20, eos_token_id=(), stop=(stop,), chat=False)[0]
        pieces = list(client.stream("Hello there", max_new_tokens=20, eos_token_id=(), stop=(stop,), chat=False))
        whole = list(client.stream("Hello there", max_new_tokens=20, eos_token_id=(), chat=False))
    assert stop and cut == full[: full.index(stop)]
    assert "".join(pieces) == cut and len(pieces) >= 1
    assert "".join(whole) == full and len(whole) > 1


def test_caches_are_freed_on_close_on_timeout_and_on_a_dropped_stream(make_server, tiny_tokenizer):
    enc, lengths = _encode(tiny_tokenizer, PROMPTS)
    with (
        make_server(ServerLimits(idle_timeout_s=0.5)) as address,
        fedsea.SplitClient(address, _split(), tokenizer=tiny_tokenizer) as client,
    ):
        h = client.split.head(enc["input_ids"], lengths).detach()
        # close
        stepper = client.stepper(max_length=64)
        stepper.step(0, h, lengths, None)
        stats = _server_stats(client)
        assert stats.generation_sessions == 1 and stats.cache_bytes > 0 and stats.server_reserved_bytes > 0
        stepper.close()
        _wait_until(lambda: _server_stats(client).generation_sessions == 0)
        assert _server_stats(client).server_cache_bytes == 0 and _server_stats(client).server_reserved_bytes == 0
        with pytest.raises(ProtocolError, match="closed"):
            stepper.step(1, h[:, -1:], None, None)
        # dropped
        stepper = client.stepper(max_length=64)
        stepper.step(0, h, lengths, None)
        assert _server_stats(client).cache_bytes > 0
        stepper.abandon()
        _wait_until(lambda: _server_stats(client).generation_sessions == 0)
        assert _server_stats(client).server_reserved_bytes == 0
        # idle timeout
        stepper = client.stepper(max_length=64)
        stepper.step(0, h, lengths, None)
        _wait_until(lambda: _server_stats(client).generation_sessions == 0)
        assert _server_stats(client).server_cache_bytes == 0
        with pytest.raises(RemoteError, match="DEADLINE_EXCEEDED: inference stream idle"):
            stepper.step(1, h[:, -1:], None, None)


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_limits_give_clear_errors_while_other_streams_go_on(make_server, tiny_tokenizer):
    enc, lengths = _encode(tiny_tokenizer, PROMPTS)
    n = enc["input_ids"].shape[1]
    split = _split()
    per_row_token = 2 * 2 * 16 * 4 * 2  # K and V x 2 kv heads x head dim 16 x fp32 x 2 trunk blocks
    budget = 3 * (n + 4) * per_row_token + 100  # room for one stream of 3 rows x (n + 4) tokens
    with (
        make_server(ServerLimits(max_cache_bytes=budget, max_seq_len=64)) as address,
        fedsea.SplitClient(address, split, tokenizer=tiny_tokenizer) as client,
    ):
        h = split.head(enc["input_ids"], lengths).detach()
        first = client.stepper(max_length=n + 4)
        first.step(0, h, lengths, None)
        second = client.stepper(max_length=n + 4)
        with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED: KV-cache budget exhausted"):
            second.step(0, h, lengths, None)
        with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED: max_length 65 exceeds the server's max_seq_len=64"):
            client.stepper(max_length=65).step(0, h, lengths, None)
        for step in range(1, 5):
            out = first.step(step, h[:, -1:], None, None)  # the first stream goes on
            assert out.shape == (3, 1, 64)
        with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED: the stream reached its max_length"):
            first.step(5, h[:, -1:], None, None)
        # A closed training session takes its streams down with a clear error.
        third = client.stepper(max_length=n + 4)
        third.step(0, h[:1], lengths[:1], None)
        assert client.connection is not None and client.session_id is not None
        client.connection.stub.CloseSession(
            pb.CloseSessionRequest(session_id=client.session_id), metadata=client.connection.metadata
        )
        with pytest.raises(RemoteError, match="NOT_FOUND"):
            third.step(1, h[:1, -1:], None, None)
        client.session_id = None


def test_twenty_concurrent_streams_from_four_clients_equal_sequential_runs(make_server, tiny_tokenizer):
    store = TokenStore()
    tokens = [store.add(f"client{i}") for i in range(4)]
    prompts = [f"Prompt number {i}: the council approved" for i in range(20)]
    splits = [_split(seed=10 + i) for i in range(4)]  # each client has its own adapters
    config = GenerationConfig(max_new_tokens=10, eos_token_id=())
    with make_server(tokens=store) as address:
        clients = [
            fedsea.SplitClient(address, splits[i], token=tokens[i], tokenizer=tiny_tokenizer).connect()
            for i in range(4)
        ]
        try:
            sequential = [clients[i % 4].generate([p], config, chat=False)[0] for i, p in enumerate(prompts)]
            results: list[str | None] = [None] * 20
            errors: list[BaseException] = []

            def run(i: int) -> None:
                try:
                    results[i] = clients[i % 4].generate([prompts[i]], config, chat=False)[0]
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert not errors, errors
            assert results == sequential
            # Different adapters really give different answers for the same prompt.
            same_prompt = [c.generate([prompts[0]], config, chat=False)[0] for c in clients]
            assert len(set(same_prompt)) > 1
        finally:
            for c in clients:
                c.close()


def test_decode_steps_carry_one_vector_per_row(server, tiny_tokenizer):
    enc, lengths = _encode(tiny_tokenizer, PROMPTS)
    with fedsea.SplitClient(server, _split(), tokenizer=tiny_tokenizer) as client:
        h = client.split.head(enc["input_ids"], lengths).detach()
        stepper = client.stepper(max_length=64)
        stepper.step(0, h, lengths, None)
        assert client.connection is not None
        before = client.connection.meter.rpc("generate")
        stepper.step(1, h[:, -1:], None, None)
        after = client.connection.meter.rpc("generate")
        stepper.close()
    theoretical = 3 * 64 * 4  # B x d x fp32, each way
    up, down = after.bytes_sent - before.bytes_sent, after.bytes_received - before.bytes_received
    assert theoretical <= up <= 1.1 * theoretical + 200
    assert theoretical <= down <= 1.1 * theoretical + 200


def test_bad_generation_requests_are_refused(server):
    with grpc.insecure_channel(server) as channel:
        from fedsea.wire import fedsea_pb2_grpc as pb_grpc

        stub = pb_grpc.TrunkStub(channel)
        step_first = iter([pb.GenerateRequest(step=pb.GenerateStep(step=0))])
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(step_first, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "open" in info.value.details()
        unknown = iter([pb.GenerateRequest(open=pb.GenerateOpen(session_id="nope", max_length=8))])
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(unknown, timeout=30))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_noise_protects_inference_too(server, tiny_tokenizer):
    split = _split()
    enc, lengths = _encode(tiny_tokenizer, PROMPTS)
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as clean:
        plain = clean.generate_ids(enc["input_ids"], lengths, max_new_tokens=10, eos_token_id=()).token_ids
    noise = fedsea.NoiseConfig(sigma=3.0, seed=5)
    outs = []
    for _ in range(2):
        with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer, noise=noise) as noisy:
            outs.append(noisy.generate_ids(enc["input_ids"], lengths, max_new_tokens=10, eos_token_id=()).token_ids)
    assert outs[0] == outs[1]  # seeded
    assert outs[0] != plain  # the trunk saw noised states, not the clean ones


def test_a_conversation_goes_through_the_chat_template(server, tiny_tokenizer):
    split = _split()
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "The movie was"},
    ]
    text = tiny_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    enc = tiny_tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
        streamed = "".join(client.stream(conversation, max_new_tokens=8, eos_token_id=()))
        direct = client.generate_ids(enc["input_ids"], enc["attention_mask"].sum(1), max_new_tokens=8, eos_token_id=())
        with pytest.raises(ValueError, match="chat template"):
            client.generate(conversation, chat=False)
    assert streamed == direct.texts[0] and streamed


def test_rewind_over_grpc_then_generate_equals_an_uninterrupted_run(server, tiny_tokenizer):
    from tests.unit.test_generation_loop import check_rewind

    split = _split()
    enc, lengths = _encode(tiny_tokenizer, PROMPTS)
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
        check_rewind(split, lambda: client.stepper(max_length=64), enc["input_ids"], lengths)
        assert _server_stats(client).generation_sessions == 0  # every stream closed, its cache freed


def test_bad_rewinds_are_refused_naming_the_field(server, tiny_tokenizer):
    from fedsea.training import SplitDecoder

    split = _split()
    enc, lengths = _encode(tiny_tokenizer, PROMPTS)
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
        slots = enc["input_ids"].shape[1]
        for bad in (0, slots + 1, slots - int(lengths.min())):  # empty, beyond the cache, a whole prompt cut
            stepper = client.stepper(max_length=64)
            decoder = SplitDecoder(split, stepper, enc["input_ids"], lengths)
            decoder.logits()  # the prefill: the server caches `slots` slots
            stepper.rewind(bad)  # no round trip: the refusal comes back with the next step
            decoder.feed(torch.zeros(len(PROMPTS), 1, dtype=torch.int64))
            with pytest.raises(RemoteError) as info:
                decoder.logits()
            assert info.value.code == "INVALID_ARGUMENT" and "rewind.length" in str(info.value), bad
            stepper.close()
        assert client.connection is not None and client.session_id is not None
        rewind_first = iter(
            [
                pb.GenerateRequest(open=pb.GenerateOpen(session_id=client.session_id, max_length=8)),
                pb.GenerateRequest(rewind=pb.GenerateRewind(length=1)),
            ]
        )
        with pytest.raises(grpc.RpcError) as raw:  # nothing cached before the prefill
            list(client.connection.stub.Generate(rewind_first, metadata=client.connection.metadata, timeout=30))
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rewind.length" in raw.value.details()


def test_a_nan_hidden_state_in_a_generation_step_is_refused(server, tiny_tokenizer):
    """The server checks the wire's host tensor for NaN/Inf before it moves it to the trunk's device."""
    from fedsea.wire.tensors import encode

    split = _split()
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
        assert client.connection is not None and client.session_id is not None
        hidden = torch.randn(1, 3, 64)
        hidden[0, 1, 5] = float("nan")
        chunks = list(encode(hidden, pb.FLOAT32))
        assert len(chunks) == 1
        requests = iter(
            [
                pb.GenerateRequest(open=pb.GenerateOpen(session_id=client.session_id, max_length=8)),
                pb.GenerateRequest(step=pb.GenerateStep(step=0, lengths=[3], hidden=chunks[0])),
            ]
        )
        with pytest.raises(grpc.RpcError) as raw:
            list(client.connection.stub.Generate(requests, metadata=client.connection.metadata, timeout=30))
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hidden" in raw.value.details()
        assert "NaN" in raw.value.details()
        # The session is still usable.
        enc, lengths = _encode(tiny_tokenizer, PROMPTS)
        assert client.generate_ids(enc["input_ids"], lengths, max_new_tokens=2, eos_token_id=()).token_ids
