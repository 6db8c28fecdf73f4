"""The reference engine's static-cache decode (``--batch-attention static``): a preallocated KV cache of
``slots`` rows x ``length`` positions per layer, and decode steps of a fixed shape per batch-size bucket
(1, 2, 4, ... up to the slots), which on CUDA are captured once with ``torch.cuda.CUDAGraph`` and replayed.

Why: a small model's decode step on a GPU is made of ~1,200 kernel launches whose host-side cost (Python,
dispatch) is ten times their device time (bench/engine.py --profile); the batched eager step adds host work
per row (cache concatenations and copies). A replayed graph launches the whole step at once, and a static
cache needs no concatenation: each row owns a slot and writes its next key and value at its own position
(vLLM's scheme, without pages: a slot is contiguous).

- A request is prefilled eagerly with the others admitted at the same step boundary (one forward of their
  right-padded prompts, livetrain.engines.batching; one admitted alone has no padding); its keys
  and values are copied into a free slot, positions 0..n-1. Slots in use are always 0..rows-1: when rows
  leave, each kept row above the new count moves into a slot a leaving row freed (``compact``).
- A decode step of ``rows`` rows runs the smallest bucket >= rows; the bucket's extra rows are dead (token
  0 at position 0, their output ignored). It attends over the shortest span (128, 256, ... positions, up
  to the slot's length) that holds every row's position: one graph per bucket and span. Its inputs are
  two small tensors (each row's last token and its position), copied into the graph's static inputs; the
  attention mask (position <= the row's) is computed inside the step. Attention is one masked
  ``scaled_dot_product_attention`` call per layer over the span, the query heads of a key/value head given
  as that head's queries (no copy of the keys per group).
- Greedy answers equal the eager paths' up to the order of sums (the masked attention runs over the
  span): in fp32 the tokens are the same (tests/python/test_engine_static.py).

A captured graph reads the weights by address: the trainer's in-place updates are seen at the next step.
Anything that replaced a parameter or buffer tensor instead (``p.data = ...``) would leave the graph on the
old memory, so every step first compares the model's tensors' addresses with those captured and captures
again when any changed (``Decoder.captures`` counts captures).

Memory: ``bytes`` = 2 x layers x slots x length x key/value heads x head_dim x element size (SmolLM2-135M in
bf16: 22.5 KiB per position, 16 slots x 2048 positions = 720 MiB), plus the graphs' activations (one pool
shared by every graph). A request whose prompt and max_tokens do not fit in ``length`` is refused.
"""

from __future__ import annotations

import sys
import threading

import torch

from livetrain.engines import options

DEFAULT_LENGTH = options.DEFAULT_STATIC_CACHE_LEN  # --static-cache-len's default
# Set in the thread running a static decode step: the attention wrapper (livetrain.engines.batching) then
# calls ``attention``.
STEP = threading.local()


class CacheTooLarge(ValueError):
    """The static cache does not fit in the device's free memory (the message says how much it needs)."""


def buckets(top: int, first: int = 1) -> list[int]:
    """The sizes a decode step runs at: ``first`` and its doublings below ``top``, and ``top``."""
    out, b = [], first
    while b < top:
        out.append(b)
        b *= 2
    return out + [top]


# The shortest attention span of a step (positions): steps attend over the smallest span in
# buckets(length, SHORTEST) that holds every row's position, not over the whole slot.
SHORTEST = 128


def attention(module, query, key, value, mask, scaling):
    """One decode step's attention over the static cache: query [B, heads, 1, head_dim], key and value
    [B, kv_heads, span, head_dim] (the slots), mask [B, 1, 1, span] (bool: the row's positions so far).
    The ``heads // kv_heads`` query heads of a key/value head attend as that head's queries, so grouped
    attention needs neither a copy of the keys nor ``enable_gqa`` (which sdpa's masked kernels lack).
    Returns [B, 1, heads, head_dim], the layout of the model's attention output."""
    b, heads, _, dim = query.shape
    q = query.reshape(b, key.shape[1], heads // key.shape[1], dim)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, 1, heads, dim)


class Cache:
    """The slots' keys and values, as the model's attention layers see a cache: ``update`` writes the
    step's key and value of each row at its position and returns every slot of the step's rows."""

    is_compileable = True  # transformers: no data-dependent mask shortcuts (a graph cannot have them)

    def __init__(self, layers: int, slots: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.index = None  # [B, kv_heads, 1, head_dim]: each row's position, set by the step
        self.span = length  # the positions the step attends over, set by the step

    def update(self, key, value, layer_idx: int, cache_kwargs=None):
        b = key.shape[0]
        k, v = self.keys[layer_idx][:b], self.values[layer_idx][:b]
        k.scatter_(2, self.index, key)
        v.scatter_(2, self.index, value)
        return k[:, :, : self.span], v[:, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given per row (position_ids); transformers asks only when they are not


class Decoder:
    """The static cache of ``model`` and its decode steps (replayed graphs when ``graphs``)."""

    def __init__(self, model, slots: int, length: int, graphs: bool, max_bytes: int | None = None):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        param = next(model.parameters())
        self.model, self.slots, self.length, self.device = model, slots, length, param.device
        dtype = model.get_input_embeddings().weight.dtype
        self.bytes = 2 * config.num_hidden_layers * slots * kv_heads * length * head_dim * dtype.itemsize
        if max_bytes is not None and self.bytes > max_bytes:
            raise CacheTooLarge(
                f"the static KV cache of {slots} slots x {length} positions needs {self.bytes / 2**20:.0f} MiB on "
                f"{self.device}, more than the {max_bytes / 2**20:.0f} MiB it may take"
            )
        try:
            self.cache = Cache(config.num_hidden_layers, slots, kv_heads, length, head_dim, dtype, self.device)
        except RuntimeError as e:  # torch.OutOfMemoryError on a GPU, RuntimeError on CPU
            raise CacheTooLarge(
                f"the static KV cache of {slots} slots x {length} positions needs {self.bytes / 2**20:.0f} MiB on "
                f"{self.device}, which is not free: lower --max-batch or --static-cache-len"
            ) from e
        self.buckets = buckets(slots)
        self.spans = buckets(length, min(SHORTEST, length))
        self.inputs = torch.zeros((slots, 2), dtype=torch.long, device=self.device)  # [slots, (token, position)]
        self.arange = torch.arange(length, device=self.device)
        self.graphs_wanted = graphs and self.device.type == "cuda"
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (rows, span)
        self.captures = 0
        self._pool = None
        self._addresses: tuple = ()

    def _forward(self, b: int, span: int) -> torch.Tensor:
        """The decode step of ``b`` rows attending over positions 0..span-1, on the static inputs: logits
        [b, vocab] in float32."""
        ids, pos = self.inputs[:b, :1], self.inputs[:b, 1:]
        _, kv_heads, _, head_dim = self.cache.keys[0].shape
        self.cache.index = pos.view(b, 1, 1, 1).expand(b, kv_heads, 1, head_dim)
        self.cache.span = span
        mask = (self.arange[:span] <= pos).view(b, 1, 1, span)
        STEP.on = True
        try:
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache, use_cache=True
            )
        finally:
            STEP.on = False
        return out.logits[:, -1].float()

    def addresses(self) -> tuple:
        """Where the model's parameters and buffers are: what a captured graph reads."""
        return tuple(t.data_ptr() for t in self.model.parameters()) + tuple(t.data_ptr() for t in self.model.buffers())

    def capture(self) -> None:
        """Captures the step of every bucket and span (the largest first, one memory pool for all)."""
        with torch.cuda.device(self.device):  # the scheduler's thread starts on GPU 0
            self._capture()

    def _capture(self) -> None:
        self.graphs, self._pool = {}, None
        torch.cuda.synchronize(self.device)
        self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        shapes = [(b, n) for b in reversed(self.buckets) for n in reversed(self.spans)]
        # Warm-up outside the capture (lazy initialisations, autotuning). It writes a running row's key and
        # value at its position, which its next step writes again before reading them.
        with torch.cuda.stream(side):
            for b, n in shapes:
                self._forward(b, n)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for b, n in shapes:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
                out = self._forward(b, n)
            self.graphs[b, n] = (g, out)
        torch.cuda.synchronize(self.device)
        self._addresses = self.addresses()
        self.captures += 1

    def warm(self) -> None:
        """Captures the graphs (when wanted); on failure says why and decodes eagerly."""
        if not self.graphs_wanted:
            return
        try:
            self.capture()
        except Exception as e:  # an op that cannot be captured: the same steps, eagerly
            self.graphs, self._pool, self.graphs_wanted = {}, None, False
            print(f"livetrain engine: warning: CUDA graphs off ({type(e).__name__}: {e})", file=sys.stderr, flush=True)

    def put_rows(self, first: int, cache) -> None:
        """Copies the rows of a prefilled batch's cache (DynamicCache [rows, kv_heads, n, head_dim] per layer)
        into slots ``first``.. on: one copy per layer and tensor."""
        for layer, k, v in zip(cache.layers, self.cache.keys, self.cache.values):
            rows, _, n, _ = layer.keys.shape
            k[first : first + rows, :, :n].copy_(layer.keys)
            v[first : first + rows, :, :n].copy_(layer.values)

    def compact(self, keep: list[int], lengths: list[int]) -> list[int]:
        """Puts the rows in slots ``keep`` (ascending; ``lengths``: their positions in use) in slots
        0..len(keep)-1, and returns which row each of those slots then holds (its slot before). A row
        already below len(keep) stays; each one above moves into a slot below that a leaving row freed
        (so as many rows move as there are such gaps, not every row after the first gap). Nothing depends on
        the rows' order: a step computes each row on its own. A slot written is free, and one read is never
        written."""
        n = len(keep)
        order = {s: s for s in keep if s < n}
        gaps = [s for s in range(n) if s not in order]
        above = [(s, length) for s, length in zip(keep, lengths) if s >= n]
        for gap, (s, length) in zip(gaps, above):
            for t in self.cache.keys + self.cache.values:
                t[gap, :, :length].copy_(t[s, :, :length])
            order[gap] = s
        return [order[j] for j in range(n)]

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Each row's next-token logits [rows, vocab] (float32): row r's token ``tokens[r]`` at ``positions[r]``."""
        rows = len(tokens)
        b = next(x for x in self.buckets if x >= rows)
        span = next(x for x in self.spans if x > max(positions))
        # Every slot's inputs, the free ones' token 0 at position 0: a capture's warm-up runs every bucket,
        # and must write only what this step writes (the free slots' position 0 is never read).
        host = torch.zeros((self.slots, 2), dtype=torch.long)
        host[:rows, 0] = torch.tensor(tokens)
        host[:rows, 1] = torch.tensor(positions)
        self.inputs.copy_(host)
        if self.graphs_wanted and self.addresses() != self._addresses:
            self.warm()  # not captured yet, or a weight was replaced rather than updated in place
        if (b, span) in self.graphs:
            g, out = self.graphs[b, span]
            g.replay()
            # The step's device time counted as the forward's (Scheduler.times), not the sampling's, which
            # would wait for it anyway.
            torch.cuda.current_stream(self.device).synchronize()
            return out[:rows]
        return self._forward(b, span)[:rows]
