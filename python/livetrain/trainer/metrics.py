"""The trainer's Prometheus metrics, rendered by prometheus_client from what the trainer's ``metrics`` op
reports (``Trainer.metrics``): the route asks the trainer at each scrape, so the numbers live in one place
(the trainer process) and the engine process, whichever it is, only formats them. The reference engine
serves them at /metrics; the vLLM plugin at /livetrain/metrics (vLLM's own /metrics is vLLM's). docs/serve.md
lists them.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Snapshot:
    """A prometheus_client collector over one ``metrics`` reply (None: the trainer did not answer)."""

    def __init__(self, snapshot: dict | None, now: float):
        self.snapshot, self.now = snapshot, now

    def collect(self):
        s = self.snapshot
        yield GaugeMetricFamily(
            "livetrain_trainer_up", "1 when the trainer answered this scrape, else 0", value=0 if s is None else 1
        )
        if s is None:
            return
        counts = s["counts"]
        yield GaugeMetricFamily(
            "livetrain_weight_version",
            "the served weights' version: +1 per training step and rollback",
            value=s["weight_version"],
        )
        yield CounterMetricFamily(
            "livetrain_steps", "training steps taken by this trainer process", value=counts["steps"]
        )
        yield CounterMetricFamily(
            "livetrain_tokens", "tokens trained on by this trainer process", value=counts["tokens"]
        )
        if s["loss"] is not None:
            yield GaugeMetricFamily("livetrain_loss", "the last training step's loss", value=s["loss"])
        yield GaugeMetricFamily(
            "livetrain_tokens_per_second", "tokens per second of the last step", value=s["tokens_per_s"]
        )
        jobs = GaugeMetricFamily("livetrain_jobs", "jobs the trainer lists (its last 100), by state", labels=["state"])
        for state, n in s["jobs"].items():
            jobs.add_metric([state], n)
        yield jobs
        if s["checkpoint_time"] is not None:
            yield GaugeMetricFamily(
                "livetrain_last_checkpoint_age_seconds",
                "seconds since the checkpoint store's head generation was saved",
                value=max(0.0, self.now - s["checkpoint_time"]),
            )
            # The age alone does not say whether anything is at risk (a store saved long ago, nothing trained
            # since): steps not yet durable are livetrain_weight_version minus this.
            yield GaugeMetricFamily(
                "livetrain_checkpoint_weight_version",
                "the weight version the checkpoint store's head generation holds (livetrain_weight_version "
                "minus this: steps and rollbacks not yet durable)",
                value=s["checkpoint_weight_version"],
            )
        yield CounterMetricFamily(
            "livetrain_guard_rollbacks",
            "jobs whose weights were rolled back to their start since this trainer process started (by the "
            "forgetting guard's verdict, or after a half-applied non-finite step)",
            value=counts["guard_rollbacks"],
        )
        yield CounterMetricFamily(
            "livetrain_nonfinite_stops",
            "jobs stopped by a non-finite loss or gradient since this trainer process started",
            value=counts["nonfinite_stops"],
        )


def render(snapshot: dict | None, now: float | None = None) -> bytes:
    """The Prometheus text exposition of a ``metrics`` reply."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(snapshot, time.time() if now is None else now))
    return generate_latest(registry)
