"""What the trainer decides about a /train job before queueing it, beyond checking its fields
(trainer.examples): whether its steps fit the per-step token budget (``--max-batch-tokens``: a job that
would not fit is split into smaller batches or refused, never run into an out-of-memory kill), and
whether it is a retry of a job already taken (``Idempotency-Key`` or a client-chosen job id), which gets
the first one's answer instead of training twice.
"""

from __future__ import annotations

import collections
import hashlib
import threading

from livetrain.trainer.protocol import Invalid, Reply, error


def fit_batch(examples: list, batch_size: int, explicit: bool, max_tokens: int) -> int:
    """The batch size a job runs with so that no step computes more than ``max_tokens`` tokens (rows ×
    the longest of them, padding included): ``batch_size`` when it fits, else, when the client did not
    ask for it (``explicit``), the largest that fits. Invalid naming the field otherwise."""
    lengths = [len(ids) for ids, _, _ in examples]
    longest = max(lengths)
    if longest > max_tokens:
        i = lengths.index(longest)
        raise Invalid(
            f"examples[{i}]",
            f"examples[{i}] is {longest} tokens, over the trainer's per-step budget of {max_tokens} tokens "
            "(--max-batch-tokens)",
        )
    rows = min(batch_size, len(examples))
    if rows * longest <= max_tokens:
        return batch_size
    fit = max_tokens // longest
    if explicit:
        raise Invalid(
            "batch_size",
            f"batch_size {batch_size} × {longest} tokens (the longest example) = {rows * longest} tokens per step, "
            f"over the trainer's per-step budget of {max_tokens} tokens (--max-batch-tokens); at most {fit} fit",
        )
    return fit


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
