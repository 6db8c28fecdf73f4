"""Continuous batching for the reference engine: requests join the running batch and leave it at
decode-step boundaries, streaming or not, and nothing waits on a client while holding the model.

Written here rather than taken from transformers (5.18: ``init_continuous_batching`` / ``generate_batch``)
because that one does not fit this engine: on CPU it falls back to ``paged|sdpa`` with a dense mask over
its whole page pool (its warm-up did not finish in 300 s for a 2-layer, 64-wide model on this project's
CPU machine), it samples every request with one generation config (no per-request seed, temperature,
top_p or stop strings), and its paged kernels give logits other than one-at-a-time decoding does. This
scheduler calls the model's own forward and cache (``DynamicCache``):

- a new request is prefilled alone (no padding: exactly today's one-at-a-time prefill), then its KV cache
  is merged into the batch's, left-padded to the longest row;
- each decode step runs every row's next token in one forward; the attention of each row is computed on
  its own, unpadded slice of the cache (``_row_attention``, ``attention="rows"``), so a row's
  logits do not depend on its batch-mates and greedy answers equal one-at-a-time decoding (bit for bit in
  bf16, tests/python/test_engine_batching.py), while the weight matrices are read once per step for the
  whole batch. That costs one attention call per row and layer; ``attention="masked"`` makes one call per
  layer over the padded cache with a mask instead (the usual batched decoding: fewer kernel launches,
  which is what a small model's step on a GPU is made of; the masked padding does not change the math,
  but the sums run in another order, so answers may differ in the last bits from one-at-a-time
  decoding);
- finished, stopped and cancelled rows leave between two steps; the cache's leading padding shared by
  every remaining row is trimmed.

``attention="static"`` decodes on a preallocated cache instead, each row in a slot of its own, in steps of
a fixed shape that are CUDA graphs on a GPU (livetrain.engines.static: no per-step cache copies and one
launch per step; answers as ``masked``'s, and requests must fit in the cache's length). ``attention="auto"``
(the engine's default, ``--batch-attention auto``) is ``static`` on a GPU and ``rows`` elsewhere, and
``rows`` where the static cache cannot serve (a model it cannot hold, a cache larger than a quarter of the GPU's free memory: a warning).

Models whose cache holds anything but plain full-attention layers (sliding windows, linear attention)
are served one request at a time by the same loop (``Scheduler.batchable`` is False).

One thread runs the model. Requests wait in a bounded admission queue (``QueueFull`` beyond it, which
the engine answers with 503 and Retry-After); tokens go to each request's ``sink`` from that thread.
``TextStream`` turns a request's tokens into text deltas (stop strings, EOS) on the consumer's side.
Every request gets one final event: an error inside the thread fails the requests it touched and the
thread goes on (``Scheduler._serve``); if the thread itself stops, everyone is told and ``submit`` raises
``Stopped``.
"""

from __future__ import annotations

import collections
import functools
import sys
import threading
import time
from typing import Callable

import torch

from livetrain import kernels
from livetrain.engines import options, static

# The decode step of the thread running it (each scheduler's own thread, so that two engines in one process
# never see each other's): ``starts``, each row's first real cache position (its left padding), None outside
# a batched decode step (the attention is then the model's own); ``spent``, the seconds its attention took.
_ROWS = threading.local()
ROW_ATTENTION = "livetrain_rows"


def _row_attention(name: str, module, query, key, value, attention_mask, **kwargs):
    """Attention of a batched decode step, row by row on each row's unpadded keys and values: the same
    call, with the same shapes, as one-at-a-time decoding makes (query [B, heads, 1, head_dim]; key and
    value [B, kv_heads, T, head_dim], left-padded), of the model's own attention implementation ``name``
    (bound when ``_use_row_attention`` registers it: the model's, whichever thread calls it)."""
    from transformers import AttentionInterface

    base = AttentionInterface._global_mapping[name]
    if getattr(static.STEP, "on", False):  # a static-cache decode step (its cache gave every slot's keys)
        return static.attention(module, query, key, value, attention_mask, kwargs.get("scaling")), None
    starts = getattr(_ROWS, "starts", None)
    if starts is None:
        return base(module, query, key, value, attention_mask, **kwargs)
    t0 = time.perf_counter()
    try:
        if name == "sdpa" and base is _sdpa_attention_forward() and kwargs.get("position_bias") is None:
            out = _row_sdpa(module, query, key, value, starts, kwargs)
            if out is not None:
                return out
        outs = []
        for b, s in enumerate(starts):
            out, _ = base(module, query[b : b + 1], key[b : b + 1, :, s:], value[b : b + 1, :, s:], None, **kwargs)
            outs.append(out)
        return torch.cat(outs, 0), None
    finally:  # the scheduler's times["attention"] (on a GPU: the time to launch these calls)
        _ROWS.spent = getattr(_ROWS, "spent", 0.0) + time.perf_counter() - t0  # any thread (a TP rank's too)


def _sdpa_attention_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _row_sdpa(module, query, key, value, starts: list[int], kwargs: dict):
    """``_row_attention`` over transformers' sdpa, with less work per row: the one ``scaled_dot_product_attention``
    call that ``sdpa_attention_forward`` makes for one row's decode step without a mask (the same arguments,
    so the same kernel and the same bits), and the rows' outputs put in the model's layout once for the batch
    rather than once per row (a copy either way). A decode step of B rows costs B attention calls per layer
    here (and on a GPU 2B small copies) instead of about 4B calls. None where that call is not the one
    transformers makes (grouped keys that it repeats rather than give with ``enable_gqa``): the caller then
    makes transformers' own call row by row."""
    from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

    extra = {}
    if getattr(module, "num_key_value_groups", 1) > 1:
        if not use_gqa_in_sdpa(None, key, value):
            return None
        extra = {"enable_gqa": True}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dropout, scale = kwargs.get("dropout", 0.0), kwargs.get("scaling")
    length = key.shape[2]
    # On a GPU each row's keys and values are given in the layout one-at-a-time decoding's cache has
    # (contiguous), so that scaled_dot_product_attention's choice of backend (flash, memory-efficient, math),
    # which looks at strides, is the one-at-a-time call's: two small copies per row and layer. On CPU (where
    # the tests check the bits) the views go as they are.
    layout = (lambda t: t) if key.device.type == "cpu" else torch.Tensor.contiguous
    # The same views as query[b : b + 1] and key[b : b + 1, :, s:], in fewer calls.
    outs = [
        sdpa(
            q,
            layout(k.narrow(2, s, length - s)),
            layout(v.narrow(2, s, length - s)),
            attn_mask=None,
            dropout_p=dropout,
            scale=scale,
            is_causal=False,
            **extra,
        )
        for q, k, v, s in zip(query.split(1), key.split(1), value.split(1), starts)
    ]
    return torch.cat(outs, 0).transpose(1, 2).contiguous(), None


def _use_row_attention(model) -> str | None:
    """Switches ``model`` to ``_row_attention`` over its own attention implementation; returns that
    implementation's name, or None when it cannot be wrapped (then the model is served one at a time)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = getattr(model.config, "_attn_implementation", None) or "sdpa"
    # A model a scheduler already switched (a second scheduler on the same model): the same base, not a
    # wrapper around the wrapper (which called itself until RecursionError).
    base = base.removeprefix(f"{ROW_ATTENTION}_")
    if base not in AttentionInterface._global_mapping or base not in AttentionMaskInterface._global_mapping:
        return None
    name = f"{ROW_ATTENTION}_{base}"
    AttentionInterface.register(name, functools.partial(_row_attention, base))
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
    model.set_attn_implementation(name)
    return base


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` with the normalisation in torch's fused ``rms_norm`` (one kernel on a GPU
    instead of pow, mean, add, rsqrt and mul: 8 launches per norm become 4, 61 norms a step for a 30-layer
    model); the same float32 formula, the same casts and the same product with the weight: equal bit for bit
    on CPU; on a GPU the fused kernel sums in another order, within a bf16 rounding of the unfused output
    (tests/python/test_engine_static.py). (``rms_norm`` on the
    bf16 input itself would save the two casts too, and gives the same bits on CPU, but its rounding on a
    GPU was not measured.)"""
    x = hidden_states.to(torch.float32)
    x = torch.nn.functional.rms_norm(x, x.shape[-1:], eps=self.variance_epsilon)
    return self.weight * x.to(hidden_states.dtype)


def fuse_rms_norms(model) -> int:
    """Switches ``model``'s plain RMSNorm layers (``kernels.LLAMA_RMS_NORMS``) to ``_rms_norm_forward``; returns
    how many. Fewer kernel launches per forward, which is what an eager step on a GPU is made of."""
    n = 0
    for module in model.modules() if isinstance(model, torch.nn.Module) else ():
        if type(module).__name__ in kernels.LLAMA_RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = _rms_norm_forward.__get__(module)
            n += 1
    return n


# How a batched decode step computes attention (see the module's docstring): --batch-attention's choices.
ATTENTION = options.BATCH_ATTENTION


AUTO_CACHE_SHARE = 0.25  # of the GPU's free memory at start, the most attention="auto" gives the static cache


def auto_attention(device: torch.device, graphs: bool) -> str:
    """What ``attention="auto"`` runs on ``device``: ``static`` where its decode steps are replayed CUDA graphs
    (a GPU: a small model's eager step is bound by kernel launches, bench/RESULTS.md), else ``rows`` (on CPU
    the eager paths batch as well as static's eager steps do)."""
    return "static" if device.type == "cuda" and graphs else "rows"


def merge_cache(mine, theirs, grow: int, start: int) -> None:
    """Appends the rows of cache ``theirs`` to cache ``mine`` (in place): ``mine``'s rows left-padded by
    ``grow`` positions, ``theirs`` by ``start`` (a tensor-parallel engine's ranks repeat it on their caches)."""
    pad = torch.nn.functional.pad
    for m, t in zip(mine.layers, theirs.layers):
        m.keys = torch.cat([pad(m.keys, (0, 0, grow, 0)), pad(t.keys, (0, 0, start, 0))])
        m.values = torch.cat([pad(m.values, (0, 0, grow, 0)), pad(t.values, (0, 0, start, 0))])


def select_rows(cache, keep: list[int], trim: int) -> None:
    """Keeps the rows ``keep`` (indices) of ``cache`` and drops its first ``trim`` positions (in place)."""
    index = torch.tensor(keep, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
        layer.values = layer.values.index_select(0, index)[:, :, trim:]


class QueueFull(RuntimeError):
    """The admission queue is full: answer 503 with ``Retry-After``."""

    def __init__(self, waiting: int):
        super().__init__(f"the engine is busy: {waiting} requests are waiting; retry later")
        self.retry_after = 1


class Stopped(RuntimeError):
    """The scheduler serves no more requests (closed, or its thread failed: the message says why): 503."""


# What a sink receives: (token or None, finish reason or None, error message or None). Finish reasons:
# "stop" (an EOS token, which is the token passed), "length", "cancelled", "error".
Sink = Callable[[int | None, str | None, str | None], None]


# The lowest temperature sampled at: a lower one above 0 is raised to it, as vLLM does (sampling_params.py,
# _MAX_TEMP). Logits divided by a temperature near 0 (1e-39 passes the [0, 2] check) overflow float32 and
# make the probabilities inf/NaN.
MIN_TEMPERATURE = 1e-2


class Sequence:
    """One request in the scheduler: prompt ids, sampling, and where its tokens go. ``temperature`` 0 is
    greedy; one in (0, ``MIN_TEMPERATURE``) is sampled at ``MIN_TEMPERATURE``."""

    def __init__(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None, sink: Sink):
        temperature = max(temperature, MIN_TEMPERATURE) if temperature > 0 else 0.0
        self.ids, self.max_tokens, self.temperature, self.top_p = ids, max_tokens, temperature, top_p
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.sink = sink
        self.generated = 0
        self.cancelled = False  # set by any thread; read by the scheduler between two steps
        self.finished = False  # its last event (a finish reason) was sent: nothing more goes to the sink

    def emit(self, tok: int | None, finish: str | None, error: str | None = None) -> None:
        if self.finished:  # one answer per request: a failure after its end is not a second one
            return
        self.finished = finish is not None
        try:
            self.sink(tok, finish, error)
        except Exception:  # the consumer is gone (its event loop closed): nobody to tell
            self.cancelled = True

    def fail(self, e: BaseException) -> None:
        """Ends the request with the error ``e`` (unless it ended already)."""
        self.emit(None, "error", f"{type(e).__name__}: {e}")


class _Row:
    __slots__ = ("seq", "start", "length", "last")

    def __init__(self, seq: Sequence, start: int, length: int, last: int):
        self.seq, self.start, self.length, self.last = seq, start, length, last


class Scheduler:
    """The model's one thread: admits requests, prefills them, and decodes every running row in one
    forward per step. ``max_batch`` rows at most (1: one request at a time, as the engine did before
    batching); ``max_queue`` requests may wait for a row. With ``attention="static"``: a static cache of
    ``max_batch`` slots x ``static_length`` positions (at most the model's context), its steps CUDA graphs
    on a GPU unless ``graphs`` is False."""

    def __init__(
        self,
        model,
        eos: set[int],
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        attention: str = "rows",
        static_length: int = static.DEFAULT_LENGTH,
        graphs: bool = True,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, not {attention!r}")
        self.device = next(model.parameters()).device
        auto = attention == "auto"
        if auto:  # static falls back to rows below where it cannot serve
            attention = auto_attention(self.device, graphs)
        self.model, self.eos, self.attention = model, eos, attention
        fuse_rms_norms(model)  # every path's forward (one at a time too): fewer launches, see _rms_norm_forward
        wrap = (max_batch > 1 or attention == "static") and self._plain_kv_cache()
        self.base = _use_row_attention(model) if wrap else None
        self.batchable = self.base is not None
        self.max_batch = max_batch if self.batchable else 1
        self.decoder = None  # static.Decoder with attention="static" (a model it can serve)
        if self.batchable and attention == "static":
            context = int(getattr(model.config, "max_position_embeddings", 0) or static_length)
            # auto takes at most a quarter of the GPU's free memory for the cache (an explicit static takes
            # what it needs, or is refused when that is not free).
            limit = (
                int(AUTO_CACHE_SHARE * torch.cuda.mem_get_info(self.device)[0])
                if auto and self.device.type == "cuda"
                else None
            )
            try:
                self.decoder = static.Decoder(model, self.max_batch, min(static_length, context), graphs, limit)
            except static.CacheTooLarge as e:
                if not auto:
                    raise
                print(f"livetrain engine: warning: {e}; --batch-attention auto uses rows", file=sys.stderr, flush=True)
        if auto and self.decoder is None:
            self.attention = "rows"
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._rows: list[_Row] = []
        self._admitting = 0  # taken from the queue, being prefilled: neither waiting nor a row yet
        self._admitted: list[Sequence] = []  # those of this turn of the loop (told if the loop fails)
        self._cache = None
        self._length = 0  # the cache's sequence length (the longest row plus the padding of the others)
        self._stop = False
        self.stopped: str | None = None  # why the scheduler's thread ended (close(), or a failure of its loop)
        self.steps = 0  # decode steps run
        self.peak_batch = 0  # the most rows one decode step ran
        # Where the scheduler thread's time went (seconds): prefills, decode steps, and of the decode steps
        # the model's forward call (on a GPU: launching its kernels; a replayed CUDA graph's time includes its
        # kernels' device time), within it the rows' attention calls, and the sampling (on a GPU, after an
        # eager forward: waiting for its kernels, then the host's work). bench/engine.py --in-process
        # reports them.
        self.times = {"prefill": 0.0, "decode": 0.0, "forward": 0.0, "attention": 0.0, "sample": 0.0}
        self._thread = threading.Thread(target=self._run, name="livetrain-scheduler", daemon=True)
        self._thread.start()

    def _plain_kv_cache(self) -> bool:
        """Whether every layer's cache is a plain full-attention key/value cache (what rows can be merged
        and split in)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=self.model.config).layers
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    # ---- any thread ----
    def submit(self, seq: Sequence) -> None:
        """Queues ``seq``; QueueFull when ``max_batch`` requests run and ``max_queue`` more already wait."""
        with self._cond:
            if self._stop:
                raise Stopped(self._stopped_reason())
            if len(self._waiting) + self._admitting + len(self._rows) >= self.max_batch + self.max_queue:
                raise QueueFull(len(self._waiting))
            self._waiting.append(seq)
            self._cond.notify()

    @property
    def failure(self) -> str | None:
        """Why the scheduler serves no more requests (``Stopped``'s reason: closed, or its loop failed), else None."""
        with self._cond:
            return self._stopped_reason() if self._stop else None

    def _stopped_reason(self) -> str:
        # close() asks the thread to stop; it says why (stopped) once it has.
        return self.stopped or "the engine is shutting down"

    def cancel(self, seq: Sequence) -> None:
        """Stops generating for ``seq`` at the next step boundary (a client that went away)."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    def load(self) -> dict:
        """Rows decoding now, requests waiting, and the most rows one decode step has run so far."""
        with self._cond:
            return {
                "running": len(self._rows),
                "waiting": len(self._waiting),
                "max_batch": self.max_batch,
                "peak_batch": self.peak_batch,
                "steps": self.steps,
                "seconds": dict(self.times),
            }

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(60)

    # ---- the scheduler thread ----
    def _run(self) -> None:
        _ROWS.starts, _ROWS.spent = None, 0.0
        reason = "the engine is shutting down"
        try:
            if self.decoder is not None:
                with torch.inference_mode():
                    self.decoder.warm()  # the graphs, before the first request
            while self._serve():
                pass
        except BaseException as e:  # the loop itself failed: it serves no more, and says so to everyone
            reason = f"the engine's scheduler stopped: {type(e).__name__}: {e}"
            print(f"livetrain engine: error: {reason}", file=sys.stderr, flush=True)
        finally:
            with self._cond:
                self._stop, self.stopped = True, reason
                left = self._admitted + list(self._waiting) + [r.seq for r in self._rows]
                self._waiting.clear()
                self._rows, self._cache = [], None
            for seq in left:
                seq.emit(None, "error", reason)

    def _serve(self) -> bool:
        """One turn of the scheduler's loop: admits what fits, then one decode step. An error there that is
        not one request's alone (a decode step, a static prefill's compaction) may leave the batch's cache
        half changed: every request admitted or running fails with it, and the next ones start afresh.
        False when the scheduler is to stop."""
        with self._cond:
            while not self._stop and not self._waiting and not self._rows:
                self._cond.wait()
            if self._stop:
                return False
            admit = []
            while self._waiting and len(self._rows) + len(admit) < self.max_batch:
                admit.append(self._waiting.popleft())
            self._admitting, self._admitted = len(admit), admit
        try:
            self._admit(admit)
            if self._rows:
                self._decode()
        except Exception as e:
            for seq in admit + [r.seq for r in self._rows]:
                seq.fail(e)  # once: a request that ended already is not told again
            with self._cond:
                self._rows, self._cache, self._length = [], None, 0
        with self._cond:
            self._admitting, self._admitted = 0, []
        return True

    def _admit(self, seqs: list[Sequence]) -> None:
        """Prefills the requests taken from the queue: into the static cache's slots all in one forward
        (``_prefill_slots``), else one by one, a request that fails failing alone."""
        if self.decoder is not None:
            try:
                self._prefill_slots(seqs)
            finally:
                with self._cond:
                    self._admitting = 0
            return
        for seq in seqs:
            try:
                if seq.cancelled:
                    seq.emit(None, "cancelled")
                else:
                    self._prefill(seq)
            except Exception as e:  # this request alone: the batch goes on
                seq.fail(e)
            finally:
                with self._cond:
                    self._admitting -= 1

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        """One token per row of ``logits`` [rows, vocab] (float32): the argmax for greedy rows; for the others
        softmax at each row's temperature, cut to its top_p, drawn with its own generator. The rows' math runs
        in one batch on the device and comes to the host in one copy, whatever the number of rows. A drawn
        row whose probabilities are not finite (non-finite logits) fails its request alone (None in its
        place): the other rows of the batch get their tokens."""
        greedy = logits.argmax(-1)
        drawn = [i for i, seq in enumerate(seqs) if seq.temperature > 0]
        if not drawn:
            return greedy.tolist()
        index = drawn if len(drawn) < len(seqs) else slice(None)
        temperature = torch.tensor([seqs[i].temperature for i in drawn], device=logits.device)
        probs = torch.softmax(logits[index] / temperature[:, None], dim=-1)
        if any(seqs[i].top_p < 1.0 for i in drawn):
            top_p = torch.tensor([seqs[i].top_p for i in drawn], device=logits.device)
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token); rows at top_p 1
            # keep every token (a cumulative sum that rounds to 1 early drops none of theirs).
            drop = (torch.cumsum(sorted_p, -1) - sorted_p >= top_p[:, None]) & (top_p < 1.0)[:, None]
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        out, probs = greedy.tolist(), probs.cpu()
        usable = (torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)).tolist()
        for j, i in enumerate(drawn):
            if not usable[j]:
                seq, bad = seqs[i], int((~torch.isfinite(logits[i])).sum())
                seq.fail(
                    ValueError(
                        f"the next token's probabilities are not finite (temperature {seq.temperature}, top_p "
                        f"{seq.top_p}; {bad} of the model's logits are not finite)"
                    )
                )
                out[i] = None
                continue
            out[i] = int(torch.multinomial(probs[j], 1, generator=seqs[i].generator))
        return out

    def _finish(self, seq: Sequence, tok: int) -> str | None:
        """Delivers ``tok``; the finish reason when ``seq`` ends with it."""
        seq.generated += 1
        if tok in self.eos:
            finish = "stop"
        elif seq.generated >= seq.max_tokens:
            finish = "length"
        else:
            finish = None
        seq.emit(tok, finish)
        return finish

    @torch.inference_mode()
    def _prefill(self, seq: Sequence) -> None:
        """One request's prefill, alone (no padding: one-at-a-time decoding's call), joining the batch's cache."""
        t0 = time.perf_counter()
        _ROWS.starts = None
        out = self.model(input_ids=torch.tensor([seq.ids], device=self.device), use_cache=True, logits_to_keep=1)
        tok = self._sample(out.logits[:, -1].float(), [seq])[0]
        self.times["prefill"] += time.perf_counter() - t0
        if tok is None or self._finish(seq, tok) is not None:  # None: it failed in _sample
            return
        self._join(_Row(seq, 0, len(seq.ids), tok), out.past_key_values)

    @torch.inference_mode()
    def _prefill_slots(self, seqs: list[Sequence]) -> None:
        """The static cache's prefill of the requests admitted at a step boundary (one or more): one forward of
        their prompts, right-padded (causal attention: a prompt's positions never see the padding after it),
        copied into the next slots at once (each slot gets the padding's keys too, after the prompt's: a
        position is written by the step that first attends to it); rows that end at their first token leave
        at once. A request that cannot be served fails alone: after an error of the forward of several, each
        is prefilled alone (the running rows' slots are not touched until a forward succeeded)."""
        ok = []
        for seq in seqs:
            if seq.cancelled:
                seq.emit(None, "cancelled")
            elif len(seq.ids) + seq.max_tokens > self.decoder.length:
                seq.fail(ValueError(self._too_long(seq)))
            else:
                ok.append(seq)
        if not ok:
            return
        first = len(self._rows)
        try:
            t0 = time.perf_counter()
            _ROWS.starts = None
            lengths = [len(seq.ids) for seq in ok]
            width = max(lengths)
            x = torch.tensor([seq.ids + [seq.ids[-1]] * (width - len(seq.ids)) for seq in ok], device=self.device)
            last = sorted(set(n - 1 for n in lengths))  # logits at each prompt's last position only
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=torch.tensor(last, device=self.device))
            pick = torch.tensor([last.index(n - 1) for n in lengths], device=self.device)
            logits = out.logits[torch.arange(len(ok), device=self.device), pick].float()
            toks = self._sample(logits, ok)
            self.decoder.put_rows(first, out.past_key_values)
            self.times["prefill"] += time.perf_counter() - t0
        except Exception as e:
            if len(ok) == 1:
                ok[0].fail(e)
                return
            # One of them may be what failed (a bad request) or their batch too large: each alone, so that
            # only what cannot be served fails.
            for seq in ok:
                self._prefill_slots([seq])
            return
        new = [
            _Row(seq, 0, n, tok) if tok is not None and self._finish(seq, tok) is None else None
            for seq, n, tok in zip(ok, lengths, toks)
        ]
        self._keep_slots(self._rows + new)

    def _keep_slots(self, by_slot: list[_Row | None]) -> None:
        """The static cache's batch after rows left: ``by_slot`` holds each slot's row, None where it left. The
        rows kept move into the first slots (``Decoder.compact``, which says which row ends in which slot)."""
        keep = [s for s, r in enumerate(by_slot) if r is not None]
        order = self.decoder.compact(keep, [by_slot[s].length for s in keep]) if len(keep) < len(by_slot) else keep
        with self._cond:
            self._rows = [by_slot[s] for s in order]

    def _too_long(self, seq: Sequence) -> str:
        return (
            f"prompt ({len(seq.ids)} tokens) + max_tokens ({seq.max_tokens}) exceeds the static KV cache of "
            f"{self.decoder.length} positions (--static-cache-len)"
        )

    def _join(self, row: _Row, cache) -> None:
        """Merges a prefilled row's cache into the batch's, left-padding the shorter side."""
        if not self._rows:
            with self._cond:
                self._cache, self._length, self._rows = cache, row.length, [row]
            return
        length = max(self._length, row.length)
        grow, row.start = length - self._length, length - row.length
        merge_cache(self._cache, cache, grow, row.start)
        for r in self._rows:
            r.start += grow
        self._length = length
        with self._cond:
            self._rows.append(row)

    @torch.inference_mode()
    def _decode(self) -> None:
        t0 = time.perf_counter()
        rows = self._rows
        if self.decoder is not None:
            logits = self.decoder.step([r.last for r in rows], [r.length for r in rows])
        else:
            logits = self._eager_step(rows)
        t1 = time.perf_counter()
        self.times["attention"] += getattr(_ROWS, "spent", 0.0)
        _ROWS.spent = 0.0
        self._length += 1
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(rows))
        toks = self._sample(logits, [r.seq for r in rows])
        t2 = time.perf_counter()
        keep = []
        for i, (r, tok) in enumerate(zip(rows, toks)):
            r.length += 1
            r.last = tok
            if tok is None:  # it failed alone in _sample: it leaves the batch
                continue
            if r.seq.cancelled:
                r.seq.emit(None, "cancelled")
            elif self._finish(r.seq, tok) is None:
                keep.append(i)
        if len(keep) < len(rows):
            self._leave(keep)
        t3 = time.perf_counter()
        self.times["forward"] += t1 - t0
        self.times["sample"] += t2 - t1
        self.times["decode"] += t3 - t0

    def _eager_step(self, rows: list[_Row]) -> torch.Tensor:
        """The next-token logits [rows, vocab] (float32) of a decode step on the batch's DynamicCache."""
        x = torch.tensor([[r.last] for r in rows], device=self.device)
        if len(rows) == 1 and rows[0].start == 0:
            # One row without padding: the call one-at-a-time decoding makes.
            _ROWS.starts = None
            out = self.model(input_ids=x, past_key_values=self._cache, use_cache=True)
        else:
            # Each row's first real cache position and its position: one small copy to the device per step.
            starts, positions = torch.tensor([[r.start, r.length] for r in rows], device=self.device).unbind(1)
            mask = (torch.arange(self._length + 1, device=self.device) >= starts[:, None]).long()
            positions = positions[:, None]
            _ROWS.starts = [r.start for r in rows] if self.attention == "rows" else None
            try:
                out = self.model(
                    input_ids=x,
                    attention_mask=mask.to(self.device),
                    position_ids=positions,
                    past_key_values=self._cache,
                    use_cache=True,
                )
            finally:
                _ROWS.starts = None
        return out.logits[:, -1].float()

    def _leave(self, keep: list[int]) -> None:
        """Keeps the rows ``keep`` (indices); trims the padding every remaining row has (or moves the static
        slots of the rows kept into the first slots)."""
        if self.decoder is not None:
            kept = set(keep)
            self._keep_slots([r if i in kept else None for i, r in enumerate(self._rows)])
            return
        rows = [self._rows[i] for i in keep]
        if not rows:
            with self._cond:
                self._rows, self._cache, self._length = [], None, 0
            return
        trim = min(r.start for r in rows)
        select_rows(self._cache, keep, trim)
        for r in rows:
            r.start -= trim
        self._length -= trim
        with self._cond:
            self._rows = rows


class TextStream:
    """The text of one request as its tokens arrive: ``push`` returns the text that can be sent now
    (text that might begin a stop string is held back until it cannot) and the finish reason when the
    request ends there (an EOS token, which is not text, or a stop string, cut before it).

    Tokens are decoded a few at a time (a window before the newest ones, as incremental detokenizers do)
    rather than the whole text again per token, and a character cut in half by a token boundary waits
    for the next token."""

    _WINDOW = 6

    def __init__(self, tokenizer, stop: list[str], eos: set[int]):
        self.tokenizer, self.stop, self.eos = tokenizer, stop, eos
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.prefix = self.read = 0  # ids[prefix:read] is the decoded window before the unread ids
        self.tokens = 0  # completion tokens, EOS included

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, tok: int) -> tuple[str, str | None]:
        self.tokens += 1
        if tok in self.eos:
            return self.flush(), "stop"
        self.ids.append(tok)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = max(self.prefix, len(self.ids) - self._WINDOW), len(self.ids)
        cut = min(
            (i for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.stop) if i >= 0), default=-1
        )
        if cut >= 0:
            delta, self.sent = self.text[self.sent : cut], cut
            return delta, "stop"
        safe = max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent : safe], safe
        return delta, None

    def feed(self, tok: int | None, finish: str | None) -> tuple[str, str | None]:
        """One scheduler event of this request (``Sink``): the text to send and the finish reason when the
        request ends here ("stop", "length"; "cancelled" for a request nobody waits for)."""
        if tok is None:
            return self.flush(), finish
        delta, reason = self.push(tok)
        if reason is None and finish == "length":
            return delta + self.flush(), "length"
        return delta, reason

    def flush(self) -> str:
        """The rest of the text (at the end: a character still incomplete is decoded as it is)."""
        if self.read < len(self.ids):
            self.text += self._decode(self.ids[self.prefix :])[len(self._decode(self.ids[self.prefix : self.read])) :]
            self.read = len(self.ids)
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta
