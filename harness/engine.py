"""The engine: kvbench drives the model itself and owns the KV cache (docs/ARCHITECTURE.md §3).

The model runs with ``past_key_values=None``, ``use_cache=False``, explicit absolute
``position_ids`` and the run's :class:`~methods.api.KVState` as the keyword argument ``kv_state``;
its attention is routed to the state's per-layer stores (:mod:`harness.attention`). No
``model.generate``: the engine prefills the context in chunks asking for no logits, calls
``end_of_context()`` (where prefill-time compression happens), extends with the question, and
decodes greedily.

Batches of prompts of different lengths are right-padded *per phase* (context chunks, question
chunks, decode steps) with a ``valid`` mask, so every row sees exactly the chunk boundaries and
positions it would see alone, and a batch gives the same tokens and logits as each prompt alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from methods.api import KVMethod, KVState, KVStats, ModelSpec, engine_reasons

from .attention import install

PROTOCOLS = ("query_agnostic", "query_aware")


class UnsupportedModel(ValueError):
    """The model or the method cannot run here; ``reasons`` says why (a skipped row's reason)."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__("; ".join(self.reasons))


@dataclass
class Prompt:
    """One sample's token ids: ``context`` is compressed at ``end_of_context``; ``question``
    follows it (query-agnostic protocol) or joins it before compression (query-aware)."""

    context: Sequence[int]
    question: Sequence[int] = ()


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # per row, greedy tokens up to (not including) the first stop token
    stopped: list[bool]  # per row, whether a stop token ended it
    logits: list[Tensor] | None  # per row (n_tokens, V) fp32: the logits each token was chosen from
    stats_context: KVStats  # right after end_of_context()
    stats_final: KVStats  # after decode
    n_forward: int  # forward passes of the model
    attention_calls: int  # calls that reached the stores


class Monitor:
    """Hooks for measurement (harness.measure implements them); the default does nothing."""

    @contextlib.contextmanager
    def phase(self, name: str, *, tokens: int = 0) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def decode_step(self) -> Iterator[None]:
        yield


@dataclass
class Engine:
    """Runs prompts through ``model`` with ``method``'s KV stores.

    ``prefill_chunk`` (tokens per forward pass over the context; None = the whole context at once)
    is part of a run's identity: a chunk's tokens attend to each other exactly and to earlier
    chunks as the store keeps them.
    """

    model: Any
    method: KVMethod
    prefill_chunk: int | None = None
    monitor: Monitor = field(default_factory=Monitor)
    cuda_graph: bool = True  # capture the decode step in a CUDA graph when every store is graph_safe
    fused_layers: str = "auto"  # decode steps through harness.fused_decoder (auto: on CUDA, supported families)

    def __post_init__(self) -> None:
        self.spec = ModelSpec.from_config(self.model.config)
        reasons = list(dict.fromkeys(engine_reasons(self.spec) + list(self.method.validate(self.spec))))
        if reasons:
            raise UnsupportedModel(reasons)
        if self.prefill_chunk is not None and int(self.prefill_chunk) < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens or None, got {self.prefill_chunk}")
        self.model.eval()
        install(self.model)
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        from .devices import layer_devices, model_devices

        # a model split over devices (device=split, accelerate device_map): each layer's store on its layer's device
        self.layer_devices = layer_devices(self.decoder)
        self.devices = model_devices(self.model)
        self.n_forward = 0
        self.kernel = getattr(self.method, "kernel", "reference")  # the path the last state ran (row column)
        self.graph_error: str | None = None  # why the last capture failed (decode then ran eagerly)
        from .fused_decoder import choose

        # why decode steps take the module path (None: they take the fused step)
        self.fused, self.fused_layers_reason = choose(self.model, self.fused_layers, self.device)

    # -- state ----------------------------------------------------------------------------------
    def new_state(self, batch: int, capacity: int) -> KVState:
        layers = [
            self.method.new_layer(self.spec.layer(i), batch=batch, capacity=capacity, device=self.layer_devices[i],
                                  dtype=self.dtype)
            for i in range(self.spec.n_layers)
        ]
        state = KVState(layers)
        self.kernel = state.kernel
        return state

    @torch.inference_mode()
    def forward(
        self,
        state: KVState,
        ids: Tensor,
        positions: Tensor,
        valid: Tensor,
        *,
        logits_at: Tensor | None = None,
        all_logits: bool = False,
    ) -> Tensor | None:
        """One forward pass of T tokens per row.

        ids, positions (B, T) int64; valid (B, T) bool. ``logits_at`` (B,) picks one token per row
        whose logits are returned as (B, V) fp32; ``all_logits`` returns (B, T, V); neither: no
        logits are computed at all (context chunks never materialise vocabulary-sized outputs).
        """
        state.positions, state.valid = positions, valid
        B = ids.shape[0]
        # A 4-D mask is passed through untouched by transformers' mask preparation (no mask is
        # built, no host sync); our attention ignores it: causality and padding are the stores'.
        out = self.decoder(
            input_ids=ids,
            position_ids=positions,
            attention_mask=torch.ones(B, 1, 1, 1, dtype=torch.bool, device=ids.device),
            past_key_values=None,
            use_cache=False,
            kv_state=state,
        )
        self.n_forward += 1
        hidden = out.last_hidden_state  # (B, T, hidden); on the last layer's device when split
        if all_logits:
            return self.lm_head(hidden).float().to(self.device)  # (B, T, V)
        if logits_at is None:
            return None
        h = hidden[torch.arange(B, device=hidden.device), logits_at.to(hidden.device)]  # (B, hidden)
        return self.lm_head(h).float().to(self.device)  # (B, V)

    def run_segment(
        self,
        state: KVState,
        seqs: Sequence[Sequence[int]],
        offsets: Sequence[int],
        *,
        chunk: int | None,
        want_last: Sequence[bool],
        last_logits: Tensor | None,
    ) -> Tensor | None:
        """Feed each row's ``seqs[b]`` at positions ``offsets[b] + i`` in chunks (right-padded).

        For rows with ``want_last[b]`` the logits of the row's last token are written into
        ``last_logits`` (B, V), allocated on first use and returned.
        """
        B = len(seqs)
        lens = [len(s) for s in seqs]
        L = max(lens, default=0)
        if L == 0:
            return last_logits
        step = int(chunk) if chunk else L
        dev = self.device
        for s in range(0, L, step):
            e = min(L, s + step)
            T = e - s
            ids = torch.zeros(B, T, dtype=torch.long)
            for b, seq in enumerate(seqs):
                part = list(seq[s:e])
                if part:
                    ids[b, : len(part)] = torch.tensor(part, dtype=torch.long)
            t = torch.arange(T)
            valid = (s + t)[None, :] < torch.tensor(lens)[:, None]  # (B, T)
            positions = torch.tensor(offsets)[:, None] + s + t[None, :]  # (B, T)
            ends = [b for b in range(B) if want_last[b] and s < lens[b] <= e]
            logits_at = None
            if ends:
                logits_at = torch.tensor([max(0, min(T - 1, lens[b] - 1 - s)) for b in range(B)], device=dev)
            logits = self.forward(state, ids.to(dev), positions.to(dev), valid.to(dev), logits_at=logits_at)
            if logits is not None:
                if last_logits is None:
                    last_logits = torch.zeros(B, logits.shape[-1], dtype=torch.float32, device=dev)
                rows = torch.tensor(ends, device=dev)
                last_logits[rows] = logits[rows]
        return last_logits

    # -- generation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        protocol: str = "query_agnostic",
        return_logits: bool = False,
    ) -> GenerationOutput:
        """Context -> end_of_context -> question -> greedy decode, for a batch of prompts."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B = len(prompts)
        if protocol == "query_aware":
            first = [list(p.context) + list(p.question) for p in prompts]
            second: list[list[int]] = [[] for _ in prompts]
        else:
            first = [list(p.context) for p in prompts]
            second = [list(p.question) for p in prompts]
        for b in range(B):
            if not first[b] and not second[b]:
                raise ValueError(f"prompt {b} is empty")
        calls0, fwd0 = 0, self.n_forward
        capacity = max(map(len, first)) + max(map(len, second)) + max_new_tokens
        state = self.new_state(B, capacity)
        n_ctx = sum(map(len, first))
        with self.monitor.phase("prefill", tokens=n_ctx):
            last = self.run_segment(
                state, first, [0] * B, chunk=self.prefill_chunk, want_last=[not q for q in second], last_logits=None
            )
        with self.monitor.phase("compress"):
            state.end_of_context()
        stats_context = state.stats()
        with self.monitor.phase("question", tokens=sum(map(len, second))):
            last = self.run_segment(
                state, second, [len(f) for f in first], chunk=self.prefill_chunk, want_last=[bool(q) for q in second],
                last_logits=last,
            )
        assert last is not None
        dev = self.device
        pos = torch.tensor([len(f) + len(q) for f, q in zip(first, second)], device=dev)  # (B,)
        stop = torch.tensor(sorted(set(int(s) for s in stop_ids)) or [-1], device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        tokens, logits_steps, done_steps = [], [], []
        logits = last
        step = self._decode_step(state, B) if max_new_tokens > 1 else None
        with self.monitor.phase("decode", tokens=B * max_new_tokens):
            for i in range(max_new_tokens):
                tok = logits.argmax(-1)  # (B,)
                tokens.append(tok)
                done_steps.append(finished.clone())
                if return_logits:
                    logits_steps.append(logits.clone())  # a graph step reuses its output buffer
                finished = finished | torch.isin(tok, stop)
                if i == max_new_tokens - 1 or bool(finished.all()):
                    break
                with self.monitor.decode_step():
                    logits = step(tok, pos, ~finished)
                pos = pos + 1
            if isinstance(step, _GraphStep):
                step.finish()
        stats_final = state.stats()
        toks = torch.stack(tokens, 1).tolist()  # (B, n)
        was_done = torch.stack(done_steps, 1).tolist()
        stop_set = set(int(s) for s in stop_ids)
        out_tokens, stopped, out_logits = [], [], []
        for b in range(B):
            row: list[int] = []
            hit = False
            for j, t in enumerate(toks[b]):
                if was_done[b][j]:
                    break
                if t in stop_set:
                    hit = True
                    break
                row.append(t)
            out_tokens.append(row)
            stopped.append(hit)
            if return_logits:
                n = len(row) + (1 if hit else 0)
                out_logits.append(torch.stack([step[b] for step in logits_steps[:n]]).cpu())
        return GenerationOutput(
            tokens=out_tokens,
            stopped=stopped,
            logits=out_logits if return_logits else None,
            stats_context=stats_context,
            stats_final=stats_final,
            n_forward=self.n_forward - fwd0,
            attention_calls=state.attention_calls - calls0,
        )

    def _decode_step(self, state: KVState, batch: int) -> Any:
        """``step(tok (B,), pos (B,), valid (B,)) -> logits (B, V)``: one greedy decode step, replayed from
        a CUDA graph when the device is CUDA and every store is ``graph_safe``, else run eagerly."""
        dev = self.device
        if self.fused is not None and not self.fused.intact():  # the model moved or was cast since: rebuild
            from .fused_decoder import choose

            self.fused, self.fused_layers_reason = choose(self.model, self.fused_layers, self.device)

        def eager(tok: Tensor, pos: Tensor, valid: Tensor) -> Tensor:
            return self.step_forward(state, tok[:, None], pos[:, None], valid[:, None])

        if not (self.cuda_graph and dev.type == "cuda" and state.graph_safe):
            return eager
        from .devices import graph_blocker

        if graph_blocker(self.devices):
            self.graph_error = graph_blocker(self.devices)
            return eager
        with self.monitor.phase("capture"):
            try:
                step = _GraphStep(self, state, batch)
            except Exception as e:  # noqa: BLE001 - a capture failure must not lose the run: decode eagerly
                self.graph_error = f"{type(e).__name__}: {e}"
                import warnings

                warnings.warn(f"CUDA-graph capture of the decode step failed ({self.graph_error}); decoding eagerly",
                              RuntimeWarning, stacklevel=2)
                return eager
        self.graph_error = None
        return step

    @torch.inference_mode()
    def step_forward(self, state: KVState, ids: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """One decode token per row (ids, positions, valid (B, 1)) -> logits (B, V) fp32: the fused step
        (:mod:`harness.fused_decoder`) where it serves this model, else :meth:`forward`."""
        if self.fused is not None:
            self.n_forward += 1
            return self.fused.forward(state, ids, positions, valid)
        zeros = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        return self.forward(state, ids, positions, valid, logits_at=zeros)

    # -- scoring (lm-eval loglikelihood / loglikelihood_rolling) --------------------------------
    def _prefill_prompt(self, prompt: Prompt, *, extra: int, protocol: str) -> tuple[KVState, Tensor, KVStats]:
        """Prefill one prompt (context, end_of_context, question); returns the state, the logits
        of the prompt's last token (V,) and the stats right after end_of_context."""
        if protocol == "query_aware":
            first, second = list(prompt.context) + list(prompt.question), []
        else:
            first, second = list(prompt.context), list(prompt.question)
        if not first and not second:
            raise ValueError("cannot score a continuation of an empty prompt")
        state = self.new_state(1, len(first) + len(second) + extra)
        with self.monitor.phase("prefill", tokens=len(first)):
            last = self.run_segment(state, [first], [0], chunk=self.prefill_chunk, want_last=[not second], last_logits=None)
        with self.monitor.phase("compress"):
            state.end_of_context()
        stats = state.stats()
        last = self.run_segment(state, [second], [len(first)], chunk=self.prefill_chunk, want_last=[bool(second)],
                                last_logits=last)
        assert last is not None
        return state, last[0], stats

    @torch.inference_mode()
    def score_continuations(
        self, prompt: Prompt, continuations: Sequence[Sequence[int]], *, protocol: str = "query_agnostic"
    ) -> tuple[list[tuple[float, bool]], KVStats]:
        """Compress the prompt once, then teacher-force each continuation on a fork of the state.

        Returns ``[(sum log p(continuation), greedy)]`` (greedy: every token is the argmax) and the
        stats after end_of_context. No eviction happens inside a continuation beyond what the
        store does on its own while extending.
        """
        if any(len(c) == 0 for c in continuations):
            raise ValueError("continuations must be non-empty")
        n0 = len(prompt.context) + len(prompt.question)
        state, last, stats = self._prefill_prompt(prompt, extra=max(map(len, continuations)), protocol=protocol)
        results = []
        for cont in continuations:
            cont = list(cont)
            logits = last[None]  # (1, V) predicts cont[0]
            if len(cont) > 1:
                st = state.fork()
                ids = torch.tensor([cont[:-1]], device=self.device)
                pos = torch.arange(n0, n0 + len(cont) - 1, device=self.device)[None]
                valid = torch.ones_like(ids, dtype=torch.bool)
                more = self.forward(st, ids, pos, valid, all_logits=True)[0]  # (n-1, V)
                logits = torch.cat([logits, more], dim=0)  # (n, V)
            logp = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(cont, device=self.device)
            total = float(logp.gather(1, target[:, None]).sum())
            greedy = bool((logits.argmax(-1) == target).all())
            results.append((total, greedy))
        return results, stats

    @torch.inference_mode()
    def score_rolling(self, tokens: Sequence[int], *, chunk: int) -> tuple[float, int, KVStats | None]:
        """Perplexity: feed ``tokens`` in chunks of ``chunk``; the first chunk is the context
        (compressed at its end), every later chunk attends to the compressed past.

        Returns (sum log p(tokens[1:]), number of scored tokens, stats after end_of_context).
        """
        tokens = list(tokens)
        if len(tokens) < 2:
            return 0.0, 0, None
        state = self.new_state(1, len(tokens))
        total, scored, stats = 0.0, 0, None
        for s in range(0, len(tokens) - 1, chunk):
            e = min(len(tokens) - 1, s + chunk)  # inputs tokens[s:e] predict tokens[s+1:e+1]
            ids = torch.tensor([tokens[s:e]], device=self.device)
            pos = torch.arange(s, e, device=self.device)[None]
            logits = self.forward(state, ids, pos, torch.ones_like(ids, dtype=torch.bool), all_logits=True)[0]
            logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
            target = torch.tensor(tokens[s + 1 : e + 1], device=self.device)
            total += float(logp.gather(1, target[:, None]).sum())
            scored += e - s
            if s == 0:
                state.end_of_context()
                stats = state.stats()
        return total, scored, stats


class _GraphStep:
    """The decode step (embedding, every layer with its store's fused decode, final norm, LM head on one
    token per row) captured once in a CUDA graph and replayed with new inputs copied into static buffers.

    Capture runs the step's Python once: the stores' ``graph_snapshot`` / ``graph_restore`` undo what the
    warm-up and the capture did to them (device counters and host bounds), and ``finish`` tells them how
    many steps the replays advanced. The engine's host counters (forward passes, attention calls) are
    advanced per replay here, since a replay runs no Python.

    Every method runs in inference mode, whoever calls it: the state's tensors were made there (prefill), and a
    store's ``graph_restore`` writes into them in place, which torch refuses outside it (RateQuant over KIVI's
    capture failed so when a test captured outside ``generate``, H100, 765db5e)."""

    @torch.inference_mode()
    def __init__(self, engine: Engine, state: KVState, batch: int):
        dev = engine.device
        self.engine, self.state = engine, state
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.valid = torch.zeros(batch, 1, dtype=torch.bool, device=dev)  # a warm-up step counts no token
        self.replays = 0
        snaps = [layer.graph_snapshot() for layer in state.layers]
        n_forward, calls = engine.n_forward, state.attention_calls
        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up: Triton compilation, cuBLAS workspaces
                for _ in range(2):
                    engine.step_forward(state, self.tok, self.pos, self.valid)
            torch.cuda.current_stream(dev).wait_stream(side)
            for layer, snap in zip(state.layers, snaps):
                layer.graph_restore(snap)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = engine.step_forward(state, self.tok, self.pos, self.valid)  # (B, V)
        finally:
            for layer, snap in zip(state.layers, snaps):
                layer.graph_restore(snap)
            engine.n_forward, state.attention_calls = n_forward, calls

    @torch.inference_mode()
    def __call__(self, tok: Tensor, pos: Tensor, valid: Tensor) -> Tensor:
        self.tok.copy_(tok[:, None])
        self.pos.copy_(pos[:, None])
        self.valid.copy_(valid[:, None])
        self.graph.replay()
        self.replays += 1
        self.engine.n_forward += 1
        self.state.attention_calls += len(self.state.layers)
        return self.logits

    @torch.inference_mode()
    def finish(self) -> None:
        for layer in self.state.layers:
            layer.graph_advance(self.replays)
        self.replays = 0
