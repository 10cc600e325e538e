"""``SplitClient``: a client's head and tail here, the trunk on a server, one train step at a time.

    with fedsea.SplitClient("127.0.0.1:50051", split, token=...) as client:
        for batch in batches:
            client.train_step(batch)
        client.save_adapters("adapters/")

The client's ``SplitModel`` defines everything: the partition points, the LoRA of each part
(the trunk's spec and initial weights are sent to the server when the session opens, so a
remote run starts exactly where an in-process one would), the base model (its fingerprint
must match the server's).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from fedsea.config import LoraSpec, NoiseConfig, OptimConfig
from fedsea.errors import ProtocolError
from fedsea.model.adapters import adapter_state_dict, load_adapter_state_dict
from fedsea.model.device import resolve_wire_dtype
from fedsea.model.fingerprint import model_fingerprint
from fedsea.model.split import SplitModel, check_token_ids
from fedsea.privacy.noise import Privatizer, make_privatizer
from fedsea.privacy.regularizers import HeadRegularizer
from fedsea.training.batch import Batch
from fedsea.training.pipeline import check_micro_batches
from fedsea.training.step import SplitTrainer, StepResult
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.adapters import assemble_state, chunk_bytes_under, named_chunks
from fedsea.wire.compress import compression as compression_enum
from fedsea.wire.convert import lora_to_pb, optim_to_pb, rpc_stats_from_pb
from fedsea.wire.shaper import NetShaper
from fedsea.wire.tensors import DEFAULT_CHUNK_BYTES, torch_dtype
from fedsea.wire.tensors import wire_dtype as wire_dtype_enum

from .connection import ClientTls, Connection, ConnectionConfig
from .deadlines import CLOSE_TIMEOUT_S, ClientTimeouts
from .generation import GenerationConfig, GenerationOutput, TextStream, generate, stream_text
from .prompts import encode_prompts
from .remote_generation import RemoteStepper
from .remote_trunk import RemoteTrunk


class SplitClient:
    """One client of a trunk server: connect, ``train_step``, close (or use ``with``).

    Args:
        server: ``host:port`` of ``fedsea serve``.
        split: this client's ``SplitModel``; its parts must carry LoRA (``split.add_lora``).
            The trunk part's spec and initial weights configure the server's trunk adapter.
        noise: clipping and Gaussian noise on h_p before it leaves (sigma = 0: none).
        grad_noise: clipping and noise on the gradient sent up to the trunk (default: none;
            see ``SplitTrainer``).
        optim: AdamW for the head and tail here, and for the trunk adapter on the server.
        wire_dtype: ``fp32``, ``bf16`` or ``fp16`` for hidden states and gradients on the wire;
            ``auto``: the model's dtype (``fp32`` for a float32 model, ``bf16`` for a bfloat16 one).
        wire_compression: ``none`` (exact), ``int8`` or ``fp8``: lossy compression of those
            tensors, both ways (``fedsea.wire.compress``; ``WireConfig.compression``).
        tls: CA (and for mutual TLS the client certificate and key); ``None`` is plaintext.
        token: the client's bearer token.
        timeouts: the deadline of each kind of call (``ClientTimeouts``: training step, decode
            step, round wait, ...) and how long a generation tries to get a lost server back.
        retries: resends of a call on UNAVAILABLE, within its deadline.
        shaper: emulated network (benchmarks); see ``fedsea.wire.shaper.NetShaper``.
        seed: seeds the server's trunk adapter if the client's trunk has no LoRA.
        tokenizer: needed to ``generate`` from text (chat template, stop strings, decoding).
        head_regularizer: a privacy loss on the head's output (``fedsea.privacy.regularizers``,
            e.g. ``NoPeekRegularizer``), trained here alongside the task; nothing of it is sent.
        micro_batches: send each step as this many micro-batches, pipelined: the server
            computes one while the next is on the wire (``fedsea.training.pipeline``). 1 (the
            default) is the unsplit step; must be <= the batch size; not with a head
            regularizer, nor in a federated run's client-batch mode.
    """

    def __init__(
        self,
        server: str,
        split: SplitModel,
        *,
        noise: NoiseConfig | None = None,
        grad_noise: NoiseConfig | None = None,
        optim: OptimConfig | None = None,
        wire_dtype: str = "auto",
        wire_compression: str = "none",
        tls: ClientTls | None = None,
        token: str | None = None,
        timeouts: ClientTimeouts | None = None,
        retries: int = 3,
        shaper: NetShaper | None = None,
        trunk_lora: LoraSpec | None = None,
        seed: int = 0,
        tokenizer: Any = None,
        head_regularizer: HeadRegularizer | None = None,
        micro_batches: int = 1,
    ) -> None:
        check_micro_batches(micro_batches)
        self.micro_batches = micro_batches
        self.split = split
        self.head_regularizer = head_regularizer
        self.noise = noise or NoiseConfig()
        self.grad_noise = grad_noise
        self.optim = optim or OptimConfig()
        self.wire_dtype = resolve_wire_dtype(wire_dtype, split.model.dtype)
        self._dtype = wire_dtype_enum(self.wire_dtype)
        self.wire_compression = wire_compression
        self._compression = compression_enum(wire_compression)  # ValueError before any connection
        self.trunk_lora = trunk_lora or getattr(split.trunk, "lora_spec", None) or LoraSpec()
        self.seed = seed
        self.tokenizer = tokenizer
        self._generations = 0
        self._chunk_bytes = DEFAULT_CHUNK_BYTES
        self.config = ConnectionConfig(
            server,
            tls=tls,
            token=token,
            timeouts=timeouts or ClientTimeouts(),
            retries=retries,
            shaper=shaper or NetShaper(),
        )
        self.connection: Connection | None = None
        self.session_id: str | None = None
        self.trainer: SplitTrainer | None = None
        self._link: RemoteTrunk | None = None
        self.session_info: pb.OpenSessionResponse | None = None
        # The server's trunk adapter, put back after a restart (``reopen_session``). None: the seed's
        # initial one; unknown (``_trunk_known`` False) once the server trained it (``train_step``).
        self._server_trunk: dict[str, torch.Tensor] | None = None
        self._trunk_known = True

    # -- lifecycle -------------------------------------------------------------------------
    def connect(self) -> SplitClient:
        """Open the channel and a training session; upload the trunk's initial adapter."""
        if self.connection is not None:
            return self
        self.connection = Connection(self.config)
        try:
            info = self._open_session()
            if getattr(self.split.trunk, "lora_spec", None) is not None:
                self.put_trunk_adapter(adapter_state_dict(self.split.trunk))
            chunk = self._chunk_bytes
            model = self.split.model
            link = RemoteTrunk(
                self.connection, info.session_id, self._dtype, chunk, model.dtype, model.device, self._compression
            )
            self._link = link
            self.trainer = SplitTrainer(
                self.split,
                trunk=link,
                noise=self.noise,
                optim=self.optim,
                grad_noise=self.grad_noise,
                head_regularizer=self.head_regularizer,
                micro_batches=self.micro_batches,
            )
        except BaseException:
            self.close()
            raise
        return self

    def _open_session(self, cap_s: float | None = None) -> pb.OpenSessionResponse:
        """Open a training session on the server: this client's spec, optimizer, wire and seed
        (``cap_s``: a shorter deadline than a control call's)."""
        connection = self.connection
        assert connection is not None
        request = pb.OpenSessionRequest(
            base_fingerprint=model_fingerprint(self.split.model),
            head_layers=self.split.head_layers,
            tail_layers=self.split.tail_layers,
            trunk_lora=lora_to_pb(self.trunk_lora),
            optimizer=optim_to_pb(self.optim),
            wire_dtype=self._dtype,
            seed=self.seed,
            wire_compression=cast("pb.TensorChunk.Compression", self._compression),
        )
        info: pb.OpenSessionResponse = connection.unary(
            "open_session", connection.stub.OpenSession, request, cap_s=cap_s
        )
        self.session_info = info
        self.session_id = info.session_id
        self._chunk_bytes = chunk_bytes_under(int(info.limits.max_message_bytes), DEFAULT_CHUNK_BYTES)
        return info

    def reopen_session(self, cap_s: float | None = None) -> tuple[Connection, str]:
        """After the server was lost: a new channel, a new session (same spec and seed; opened
        within ``cap_s``) and the same trunk adapter put back; returns the connection and session id.

        Raises ``ProtocolError`` when the server had trained the trunk adapter since this client
        last put or fetched it (``train_step``): it died with the server. Counters and trainer stay.
        """
        if not self._trunk_known:
            raise ProtocolError(
                "the server was lost, and with it the trunk adapter it trained in this session: cannot resume "
                "(fetch it with sync_trunk_adapter() or save_adapters() before generating to make that possible)"
            )
        old = self.connection
        self.connection = Connection(self.config, meter=old.meter if old is not None else None)
        if old is not None:
            old.close()
        self.session_id = None
        self._open_session(cap_s)
        if self._server_trunk is not None:
            self.put_trunk_adapter(self._server_trunk)
        if self._link is not None:  # later training steps go to the new session
            self._link.connection, self._link.session_id = self.connection, str(self.session_id)
        return self.require_connection()

    def close(self) -> None:
        """Close the session (freeing the server's memory) and the channel."""
        if self.connection is None:
            return
        try:
            if self.session_id is not None:
                self.connection.unary(
                    "close_session",
                    self.connection.stub.CloseSession,
                    pb.CloseSessionRequest(session_id=self.session_id),
                    cap_s=CLOSE_TIMEOUT_S,
                )
        except Exception:  # closing must not mask the original error
            pass
        finally:
            if self._link is not None:
                self._link.close()
                self._link = None
            self.connection.close()
            self.connection = None
            self.session_id = None

    def __enter__(self) -> SplitClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require(self) -> tuple[Connection, SplitTrainer]:
        if self.connection is None or self.trainer is None:
            raise ProtocolError("not connected: call connect() or use 'with SplitClient(...)'")
        return self.connection, self.trainer

    def require_connection(self) -> tuple[Connection, str]:
        """The open connection and this client's session id; raises ``ProtocolError`` when not connected."""
        if self.connection is None or self.session_id is None:
            raise ProtocolError("not connected: call connect() or use 'with SplitClient(...)'")
        return self.connection, self.session_id

    # -- training ----------------------------------------------------------------------------
    def reset_optimizers(self) -> None:
        """Fresh AdamW state for head and tail here (the trunk's is the server's)."""
        self._require()[1].reset_optimizers()

    def reseed_noise(self, secret: str, *context: object) -> None:
        """Reseed the noise on h_p and on the gradient from ``secret``, which never leaves this client,
        and a public ``context`` (run seed, name, round: ``fedsea.privacy.noise.make_privatizer``)."""
        self._require()[1].reseed_noise(secret, context)

    def train_step(self, batch: Batch) -> StepResult:
        """One step: head and tail update here, the trunk adapter on the server."""
        connection, trainer = self._require()
        start = time.perf_counter()
        before = connection.meter.as_dict()
        self._trunk_known = False  # the server's trunk adapter now differs from anything kept here
        result = trainer.train_step(batch)
        after = connection.meter.as_dict()
        waited = float(after["network_s"]) - float(before["network_s"])  # type: ignore[arg-type]
        remote = float(after["remote_compute_s"]) - float(before["remote_compute_s"])  # type: ignore[arg-type]
        # Pipelined micro-batch calls overlap each other and this thread's compute, so their
        # summed network and remote seconds can exceed the step's wall time: never negative.
        connection.meter.add_local_compute(max(0.0, time.perf_counter() - start - waited - remote))
        return result

    # -- generation ----------------------------------------------------------------------------
    def _config(self, config: GenerationConfig | None, kwargs: dict[str, Any]) -> GenerationConfig:
        config = dataclasses.replace(config, **kwargs) if config is not None else GenerationConfig(**kwargs)
        if config.eos_token_id is None and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            config = dataclasses.replace(config, eos_token_id=(int(self.tokenizer.eos_token_id),))
        return config

    def stepper(self, max_length: int, use_cache: bool = True) -> RemoteStepper:
        """Open an inference stream on the server (the trunk's half of one generation)."""
        connection, session_id = self.require_connection()
        return RemoteStepper(
            connection,
            session_id,
            self._dtype,
            self._chunk_bytes,
            max_length,
            self.split.model.dtype,
            use_cache,
            self.split.model.device,
            self._compression,
            reopen=self.reopen_session,
        )

    def generate_ids(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, config: GenerationConfig | None = None, **kwargs: Any
    ) -> GenerationOutput:
        """Generate from left-padded token ids (B, n) and their lengths (B,)."""
        config = self._config(config, kwargs)
        device = self.split.model.device  # the head's: ids made on the CPU go there
        check_token_ids(input_ids, self.split.head.embed_tokens.num_embeddings)  # before the move
        input_ids, lengths = input_ids.to(device), lengths.to(device)
        stepper = self.stepper(int(input_ids.shape[1]) + config.max_new_tokens, config.use_cache)
        return generate(self.split, stepper, input_ids, lengths, config, self.tokenizer, self._inference_privatizer())

    def generate(
        self, prompts: str | list[str], config: GenerationConfig | None = None, chat: bool | None = None, **kwargs: Any
    ) -> list[str]:
        """Answer each prompt (chat template applied when the tokenizer has one); returns the texts.

        Keyword arguments are ``GenerationConfig`` fields: ``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``, ``repetition_penalty``, ...
        """
        input_ids, lengths = encode_prompts(self.tokenizer, self.split, prompts, chat)
        return self.generate_ids(input_ids, lengths, config, **kwargs).texts

    def stream(
        self,
        prompt: str | list[dict[str, str]],
        config: GenerationConfig | None = None,
        chat: bool | None = None,
        **kwargs: Any,
    ) -> TextStream:
        """Yield the answer to one prompt (or conversation) piece by piece, as it is generated; once
        exhausted, its ``finish_reason`` says whether it ended (``stop``) or was cut (``length``)."""
        input_ids, lengths = encode_prompts(self.tokenizer, self.split, prompt, chat)
        config = self._config(config, kwargs)
        stepper = self.stepper(int(input_ids.shape[1]) + config.max_new_tokens, config.use_cache)
        return stream_text(
            self.split, stepper, input_ids, lengths, config, self.tokenizer, self._inference_privatizer()
        )

    def _inference_privatizer(self) -> Privatizer | None:
        """The session's noise applies to inference too; fresh noise for every generation."""
        device = self.split.model.device
        privatizer = make_privatizer(self.noise, device, purpose="inference", generation=self._generations)
        if privatizer is not None:
            self._generations += 1
        return privatizer

    # -- adapters ------------------------------------------------------------------------------
    def put_trunk_adapter(self, state: dict[str, torch.Tensor]) -> int:
        """Replace the server's trunk adapter for this session (its optimizer restarts there)."""
        connection, session_id = self.require_connection()

        def requests() -> Iterator[pb.NamedTensorChunk]:
            return named_chunks(state, session_id=session_id)

        responses = connection.stream("put_adapter", connection.stub.PutTrunkAdapter, requests, kind="adapter")
        # Kept to put back after a server restart: a LoRA adapter, small next to the model.
        self._server_trunk = {name: tensor.detach().clone() for name, tensor in state.items()}
        self._trunk_known = True
        return int(responses[0].tensors)

    def trunk_adapter(self) -> dict[str, torch.Tensor]:
        """The server's current trunk adapter for this session (float32 tensors)."""
        connection, session_id = self.require_connection()
        request = pb.AdapterRequest(session_id=session_id)
        chunks = connection.collect("get_adapter", connection.stub.GetTrunkAdapter, request, kind="adapter")
        state = assemble_state(chunks, "adapter")
        self._server_trunk = {name: tensor.clone() for name, tensor in state.items()}
        self._trunk_known = True
        return state

    def sync_trunk_adapter(self) -> None:
        """Copy the server's trunk adapter into the local trunk view (for saving or export)."""
        if getattr(self.split.trunk, "lora_spec", None) is None:
            from fedsea.model.adapters import add_lora

            add_lora(self.split.trunk, self.trunk_lora)
        load_adapter_state_dict(self.split.trunk, self.trunk_adapter())

    def save_adapters(self, directory: str | os.PathLike[str]) -> Path:
        """Write head, trunk (fetched from the server) and tail adapters under ``directory``, and in
        peft's format under ``directory/peft`` (``SplitModel.save_adapters``)."""
        self.sync_trunk_adapter()
        return self.split.save_adapters(directory)

    # -- accounting ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Bytes and seconds per RPC kind on this client, and the server's view of this client."""
        connection, _ = self.require_connection()
        report: dict[str, Any] = dict(connection.meter.as_dict())
        server = connection.unary("stats", connection.stub.GetStats, pb.StatsRequest())
        report["server"] = rpc_stats_from_pb(server.rpcs)
        report["wire_dtype"] = self.wire_dtype
        report["wire_compression"] = self.wire_compression
        report["wire_itemsize"] = torch.tensor([], dtype=torch_dtype(self._dtype)).element_size()
        return report
