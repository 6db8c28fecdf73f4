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


def fit_batch(examples: list, batch_size: int, explicit: bool, max_tokens: int, replay: int = 0) -> int:
    """The batch size a job runs with so that no step computes more than ``max_tokens`` tokens (rows ×
    the longest of them, padding included): ``batch_size`` when it fits, else, when the client did not
    ask for it (``explicit``), the largest that fits. ``replay`` retention rows join every step (the
    forgetting guard's replay): they count as rows as long as the job's longest example, and are cut to
    ``replay_width`` when the job runs, so the step stays within the budget whatever their length.
    Invalid naming the field otherwise."""
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
    rows = min(batch_size, len(examples)) + replay
    if rows * longest <= max_tokens:
        return batch_size
    fit = max_tokens // longest - replay
    if explicit:
        with_replay = f" + {replay} replayed retention rows" if replay else ""
        raise Invalid(
            "batch_size",
            f"batch_size {batch_size}{with_replay} × {longest} tokens (the longest example) = {rows * longest} "
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
