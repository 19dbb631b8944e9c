"""Prometheus metrics, one registry per application."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.entries = Counter(
            "logserver_entries",
            "Entries appended to the log.",
            registry=self.registry,
        )
        self.duplicates = Counter(
            "logserver_duplicate_submissions",
            "Submissions answered with an entry already in the log.",
            registry=self.registry,
        )
        self.tree_size = Gauge(
            "logserver_tree_size",
            "Size of the latest signed checkpoint.",
            registry=self.registry,
        )
        self.pending = Gauge(
            "logserver_pending_submissions",
            "Submissions waiting to be sequenced.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "logserver_batch_size",
            "Entries integrated per batch.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=self.registry,
        )
        self.integration_seconds = Histogram(
            "logserver_integration_seconds",
            "Time to store a batch and sign its checkpoint.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.sequencing_failures = Counter(
            "logserver_sequencing_failures",
            "Batches that failed to sign or store, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "logserver_policy_decisions",
            "Policy decisions recorded in the audit table, by decision.",
            ["decision"],
            registry=self.registry,
        )
        self.quorum_conflicts = Counter(
            "logserver_quorum_conflicts",
            "Builders that reported another digest for the same artifact and "
            "commit than the quorum: alert on any increase.",
            ["rule"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "logserver_rate_limited",
            "Requests refused with 429 because the caller was over its limit.",
            registry=self.registry,
        )
        self.policy_reloads = Counter(
            "logserver_policy_reloads",
            "Policy reloads (SIGHUP), by result: ok or failed.",
            ["result"],
            registry=self.registry,
        )
        self.requests = Histogram(
            "logserver_request_seconds",
            "HTTP request latency by route and status.",
            ["route", "method", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )

    def watch_signers(
        self, signers: Callable[[], Iterable[tuple[str, str, object]]]
    ) -> None:
        """Export the workers each signer has lost, read at every scrape.

        `signers` gives (role, key name, signer) triples, role being
        "artifact" or "checkpoint"; signers without worker processes (no
        `workers_lost`) are left out.
        """
        self.registry.register(_WorkersLost(signers))


class _WorkersLost(Collector):
    def __init__(
        self, signers: Callable[[], Iterable[tuple[str, str, object]]]
    ) -> None:
        self._signers = signers

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "logserver_signing_workers_lost",
            "Signing worker processes lost (an HSM session's, or a software "
            "key's); each is replaced. Alert on any increase.",
            labels=["role", "key"],
        )
        for role, name, signer in self._signers():
            lost = getattr(signer, "workers_lost", None)
            if isinstance(lost, int):
                family.add_metric([role, name], lost)
        yield family
