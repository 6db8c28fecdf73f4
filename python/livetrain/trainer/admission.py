"""What the trainer decides about a /train job before queueing it, beyond checking its fields
(trainer.examples): whether its steps fit the per-step token budget (``--max-batch-tokens``: a job that
would not fit is split into smaller batches or refused, never run into an out-of-memory kill; the
guard's replayed rows count, and so do the forward-only batches of loss evaluations), and
whether it is a retry of a job already taken (``Idempotency-Key`` or a client-chosen job id), which gets
the first one's answer instead of training twice.
"""

from __future__ import annotations

import collections
import hashlib
import threading

from livetrain.trainer.protocol import Invalid, Reply, error


def fit_batch(examples: list, batch_size: int, explicit: bool, max_tokens: int, replay: int = 0, later: int = 0) -> int:
    """The batch size a job runs with so that no step computes more than ``max_tokens`` tokens (rows ×
    the longest of them, padding included): ``batch_size`` when it fits, else, when the client did not
    ask for it (``explicit``), the largest that fits. ``replay`` retention rows join every step (the
    forgetting guard's replay): they count as rows as long as the job's longest example, and are cut to
    ``replay_width`` when the job runs, so the step stays within the budget whatever their length (with
    an anchor they join the same forward: trainer.service ``Trainer.loss``). ``later``: how many more
    examples may join the job when it runs (its rewordings, trainer.augment: each at most as long as its
    longest example), counted as if they had. Invalid naming the field otherwise."""
    lengths = [len(ids) for ids, _, _ in examples]
    longest = max(lengths)
    i = lengths.index(longest)
    if longest > max_tokens:
        raise Invalid(
            f"examples[{i}]",
            f"examples[{i}] is {longest} tokens, over the trainer's per-step budget of {max_tokens} tokens "
            "(--max-batch-tokens)",
        )
    if (1 + replay) * longest > max_tokens:
        raise Invalid(
            "replay",
            f"examples[{i}] is {longest} tokens: with the {replay} replayed retention rows that join every step, "
            f"one example takes {(1 + replay) * longest} tokens per step, over the trainer's per-step budget of "
            f'{max_tokens} tokens (--max-batch-tokens); send a smaller "replay" (0: none) or shorter examples',
        )
    rows = min(batch_size, len(examples) + later) + replay
    if rows * longest <= max_tokens:
        return batch_size
    fit = max_tokens // longest - replay
    if explicit:
        with_replay = f" + {replay} replayed retention rows" if replay else ""
        reworded = f" (counting the up to {later} rewordings that join the job)" if later else ""
        raise Invalid(
            "batch_size",
            f"batch_size {batch_size}{reworded}{with_replay} × {longest} tokens (the longest example) = {rows * longest} "
            f"tokens per step, over the trainer's per-step budget of {max_tokens} tokens (--max-batch-tokens); "
            f"at most {fit} fit",
        )
    return fit


def replay_width(max_tokens: int, rows: int, replay: int) -> int:
    """How many tokens each replayed retention row may keep in a step of ``rows`` job examples and
    ``replay`` replay rows: the budget's share of one row (at least the job's longest example, since
    ``fit_batch`` admitted the job)."""
    return max_tokens // (rows + replay)


def chunks(lengths: list[int], max_rows: int, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of rows of ``lengths`` tokens, each at most ``max_rows`` rows and
    ``max_tokens`` tokens (rows × the longest, padding included; a row longer than the budget goes alone):
    the forward-only batches of a loss evaluation, so that they stay within the step budget too."""
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        wider = max(longest, n)
        if i > start and (i - start >= max_rows or (i - start + 1) * wider > max_tokens):
            out.append((start, i))
            start, wider = i, n
        longest = wider
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out


def job_key(idempotency_key: str | None, job_id: str | None) -> str | None:
    """The key retries of one submission share: the client's job id, else its Idempotency-Key."""
    if job_id is not None:
        return f"id:{job_id}"
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise Invalid("Idempotency-Key", "Idempotency-Key must be 1 to 255 characters")
        return f"key:{idempotency_key}"
    return None


class Retries:
    """The answers to submissions that carried a key, so that a retry (a client that timed out while the
    trainer was still tokenizing, say) gets the same job. A retry that arrives while the first attempt is
    still being checked waits for it. Only accepted jobs (202) are remembered: a refused one may be sent
    again. The last ``limit`` keys are kept."""

    def __init__(self, limit: int = 10_000):
        self.limit = limit
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, dict] = collections.OrderedDict()

    def run(self, key: str | None, body: bytes, submit) -> Reply:
        """``submit()``'s reply, or the remembered one when ``key`` was seen with the same body; 409 when
        it was seen with another body."""
        if key is None:
            return submit()
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = {"digest": digest, "done": threading.Event(), "reply": None}
                mine = True
            else:
                mine = False
        if not mine:
            entry["done"].wait()
            if entry["digest"] != digest:
                return error(
                    409,
                    f"{self._what(key)} was already used for another request body; use a new one for a new job",
                    self._what(key),
                )
            if entry["reply"] is not None:
                return Reply(entry["reply"].code, {**entry["reply"].body, "duplicate": True})
            return self.run(key, body, submit)  # the first attempt was refused: this one tries again
        try:
            reply = submit()
        except BaseException:
            reply = None
            raise
        finally:
            with self._lock:
                if reply is not None and reply.code == 202:
                    entry["reply"] = reply
                    while len(self._entries) > self.limit:
                        self._entries.popitem(last=False)
                else:
                    self._entries.pop(key, None)
            entry["done"].set()
        return reply

    @staticmethod
    def _what(key: str) -> str:
        return "job id" if key.startswith("id:") else "Idempotency-Key"


# What one trained token costs the trainer during a step, per hidden unit and layer, in bytes of a 2-byte
# dtype (scaled by the weights' element size). CUDA: the activations kept for the backward under gradient
# checkpointing, 3.2-3.4 measured by bench/train_memory.py on an H200 for SmolLM2-135M's and Qwen3-8B's shapes
# (bench/RESULTS.md, fourth session; the chunked loss adds no per-vocabulary term). CPU: 4.8, the largest of
# bench/train_memory.py's CPU points for the default model in fp32 (162.8 KiB per token at 8 rows x 512 tokens;
# 155.8 KiB per token fitted over 512-4,096 tokens in 1 and 8 rows; bench/RESULTS.md, 2026-12-01): the process's
# peak resident memory, so the CPU allocator's slack is in it.
CUDA_BYTES_PER_TOKEN_UNIT = 3.4
CPU_BYTES_PER_TOKEN_UNIT = 4.8
# The step's fixed workspace beyond the per-token part (0.18-0.75 GiB measured), and the margin over the fit.
FIXED_BYTES = 1 << 30
MARGIN = 1.25
MEMORY_SHARE = 0.10  # of the device's memory one step may take (a tenth: beside a 27B engine on one H200)


def _host_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory for this process: the machine's, within its cgroup's limit."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
    total, available = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            total, available = min(total, int(limit)), min(available, int(limit) - used)
    except (OSError, ValueError):  # no cgroup v2 memory controller: the machine's figures
        pass
    return total, available


def step_bytes_per_token(hidden: int, layers: int, dtype_bytes: int, device_type: str) -> float:
    """The memory one trained token may take in a step (the measured cost per token unit on the device,
    with the margin): what turns the per-step token budget into bytes and back."""
    per_unit = CUDA_BYTES_PER_TOKEN_UNIT if device_type == "cuda" else CPU_BYTES_PER_TOKEN_UNIT
    return MARGIN * per_unit * hidden * layers * dtype_bytes / 2


def step_memory(
    max_tokens: int, hidden: int, layers: int, dtype_bytes: int, device_type: str, batch_bytes: int = 0
) -> float:
    """The memory a step of ``max_tokens`` tokens may take: its workspace, the gradients that wait for a
    batched optimizer step (``batch_bytes``: ``step_batch_bytes``) and its tokens (what
    ``auto_max_batch_tokens`` sized the budget from, or what ``--max-batch-tokens N`` allows)."""
    return FIXED_BYTES + batch_bytes + max_tokens * step_bytes_per_token(hidden, layers, dtype_bytes, device_type)


# --step-batch-mib auto: the share of the trained weights' bytes whose gradients may wait for a batched step, and
# its cap. A batch costs a few launches whatever its size; a sixteenth keeps the model's matrices in about 16
# batches, and the cap keeps 27B's within its memory target. On the H200 (bench/optim.py --full's hooks rows,
# bench/RESULTS.md, fifth session): 1.20x the HBM floor at 8B and 1.14x at 27B, against 1.93x / 1.70x one
# parameter at a time; 256 MiB 1.30x / 1.25x, 4096 MiB 1.35x / 1.11x (docs/tuning.md).
STEP_BATCH_SHARE = 1 / 16
STEP_BATCH_CAP = 1 << 30


def step_batch_bytes(setting: int | str, trained_bytes: int, device_type: str) -> int:
    """The gradient bytes the backward hooks let wait for a batched step (``Apollo.attach_hooks(batch_bytes=...)``)
    under ``--step-batch-mib`` ``setting``: N MiB, or auto (STEP_BATCH_SHARE of the trained weights' bytes, at
    most STEP_BATCH_CAP, on CUDA; 0 on the CPU, whose steps have no launches to save)."""
    if setting != "auto":
        return int(setting) << 20
    if device_type != "cuda":
        return 0
    return min(STEP_BATCH_CAP, int(trained_bytes * STEP_BATCH_SHARE))


def cache_bytes(config, dtype_bytes: int) -> tuple[int, int]:
    """(bytes per token, bytes per row) of the cache that generating a batch keeps on ``config``'s text model
    (transformers' caches): per token, each attention layer's keys and values (2 × KV heads × head dim, in
    the weights' dtype; a sliding window counted as full); per row, each linear-attention layer's recurrent
    state (value heads × key dim × value dim, float32) and convolution window (Qwen3.5's Gated DeltaNet:
    about 150 MiB a row on the 27B model, where its 16 attention layers keep 64 KiB a token)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = c.num_hidden_layers
    linear = sum(t == "linear_attention" for t in (getattr(c, "layer_types", None) or []))
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    per_token = (layers - linear) * 2 * kv_heads * head_dim * dtype_bytes
    per_row = 0
    if linear:
        vh, kh = c.linear_num_value_heads, c.linear_num_key_heads
        kd, vd = c.linear_key_head_dim, c.linear_value_head_dim
        conv = (2 * kh * kd + vh * vd) * c.linear_conv_kernel_dim * dtype_bytes
        per_row = linear * (vh * kd * vd * 4 + conv)
    return per_token, per_row


def generation_batches(
    lengths: list[int], new_tokens: int, max_rows: int, max_bytes: float, per_token: int, per_row: int
) -> list[list[int]]:
    """The batches (indices into ``lengths``, shortest prompts first: similar lengths pad less) in which
    prompts of ``lengths`` tokens are answered with up to ``new_tokens`` tokens each (guard.greedy): at most
    ``max_rows`` rows, and at most ``max_bytes`` of cache when the batch ends (``cache_bytes``: rows × (the
    row's state + (the longest prompt + new_tokens) × a token's KV); a prompt over it goes alone)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cost = [per_row + (lengths[i] + new_tokens) * per_token for i in order]
    return [order[a:b] for a, b in chunks(cost, max_rows, max_bytes)]


def auto_max_batch_tokens(hidden: int, layers: int, dtype_bytes: int, device, batch_bytes: int = 0) -> tuple[int, str]:
    """``--max-batch-tokens auto``: the tokens one step may compute so that its memory (measured cost per
    token × the model's hidden size × its layers, plus a fixed workspace and the gradients that wait for a
    batched optimizer step, ``batch_bytes``, with a margin) stays within a tenth of the device's memory and
    80% of what is free now (after the weights and the optimizer state): the number, and how it was chosen
    (for the log and /train/status). At least 256."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        where, source = torch.cuda.get_device_name(device), "bench/train_memory.py's CUDA figure"
    else:
        total, free = _host_memory()
        where, source = "host memory", "bench/train_memory.py's CPU figure"
    budget = min(MEMORY_SHARE * total, 0.8 * free) - FIXED_BYTES - batch_bytes
    per_token = step_bytes_per_token(hidden, layers, dtype_bytes, device.type)
    tokens = max(256, int(budget // per_token))
    waiting = f" and {batch_bytes / 2**30:.2f} GiB of gradients waiting for a batched step" if batch_bytes else ""
    how = (
        f"auto: {budget / 2**30:.1f} GiB for a step ({MEMORY_SHARE:.0%} of {where}'s {total / 2**30:.0f} GiB, at most "
        f"80% of the {free / 2**30:.1f} GiB free, less {FIXED_BYTES / 2**30:.0f} GiB of workspace{waiting}) / "
        f"{per_token / 1024:.0f} KiB per token "
        f"({hidden} hidden × {layers} layers, {source})"
    )
    return tokens, how
