"""Metrics (Prometheus) and traces (OpenTelemetry): optional, and off until enabled.

    from bssagent.observability import enable_metrics, enable_tracing

    enable_metrics()                     # on prometheus_client's default registry
    enable_tracing()                     # spans on OpenTelemetry's global tracer provider

Metrics (``pip install 'bssagent[metrics]'``); labels never carry user or thread ids:

==========================================  =========  ==============================
name                                        type       labels
==========================================  =========  ==============================
``bssagent_sessions_created_total``         counter    namespace
``bssagent_sessions_ended_total``           counter    namespace, status
``bssagent_sessions_expired_total``         counter    namespace
``bssagent_get_or_create_seconds``          histogram  namespace, cache (hit / miss)
``bssagent_runs_total``                     counter    agent, outcome (ok / error)
``bssagent_run_seconds``                    histogram  agent
``bssagent_run_lock_wait_seconds``          histogram  agent
``bssagent_degraded``                       gauge      component (sessions / checkpoints)
``bssagent_degraded_transitions_total``     counter    component, to (degraded / ok)
``bssagent_maintenance_total``              counter    namespace, task (expired / retained
                                                       / swept)
``bssagent_journal_total``                  counter    component (sessions / checkpoints /
                                                       store), outcome (replayed / merged /
                                                       refused / rejected)
==========================================  =========  ==============================

The cache hit ratio is ``rate(bssagent_get_or_create_seconds_count{cache="hit"}[5m])`` over
the sum of both. Traces (``pip install 'bssagent[otel]'``): a span per session resolution
(``bssagent.get_or_create_user_session``) and per agent run (``bssagent.agent.run``), with the
namespace, backend, agent and outcome as attributes; the thread id only with
``record_thread_ids=True``; user ids and message content never.

Until a function here enables them, every hook is one global check: no import of either
package, no registry side effect.

Logs go through :mod:`logging` under ``bssagent`` (``bssagent.sessions``, ``bssagent.agent``);
records of notable events carry structured fields (``bssagent_event`` = ``degraded`` /
``recovered`` / ``maintenance`` / ..., and ``bssagent_*`` details), never message content or
DSN passwords.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

_metrics: _Metrics | None = None
_tracer: Any = None
_thread_ids = False

# Seconds; session resolution is sub-millisecond on a hit, agent runs take up to minutes.
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _Metrics:
    """The Prometheus objects, registered on one registry."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Any:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: Any) -> Any:
            return Histogram(name, doc, labels, registry=registry, buckets=buckets)

        self.created = counter("bssagent_sessions_created", "Sessions created.", ("namespace",))
        self.ended = counter("bssagent_sessions_ended", "Sessions ended.", ("namespace", "status"))
        self.expired = counter(
            "bssagent_sessions_expired", "Sessions expired (idle).", ("namespace",)
        )
        self.lookup = histogram(
            "bssagent_get_or_create_seconds",
            "get_or_create_user_session latency, by cache outcome.",
            ("namespace", "cache"),
            _FAST,
        )
        self.runs = counter("bssagent_runs", "Agent runs finished.", ("agent", "outcome"))
        self.run_seconds = histogram(
            "bssagent_run_seconds", "Agent run duration.", ("agent",), _SLOW
        )
        self.lock_wait = histogram(
            "bssagent_run_lock_wait_seconds",
            "Time an agent run waited for its thread's run lock.",
            ("agent",),
            (*_FAST, 2.5, 5.0, 10.0, 30.0),
        )
        self.degraded = Gauge(
            "bssagent_degraded",
            "1 while a component serves from memory because the database is unreachable.",
            ("component",),
            registry=registry,
        )
        self.transitions = counter(
            "bssagent_degraded_transitions",
            "Entries into and exits from degraded mode.",
            ("component", "to"),
        )
        self.journal = counter(
            "bssagent_journal",
            "Outage journal: writes made in memory replayed to the database, merged into a "
            "new thread, or refused because the journal was full.",
            ("component", "outcome"),
        )
        self.maintenance = counter(
            "bssagent_maintenance",
            "Sessions expired, threads retained or swept by housekeeping.",
            ("namespace", "task"),
        )


def enable_metrics(registry: Any = None) -> None:
    """Register bssagent's metrics on ``registry`` (default: prometheus_client's) and
    start recording them. Calling it again moves recording to the new registry.

    Raises:
        ConfigurationError: ``prometheus_client`` is not installed.
    """
    global _metrics
    try:
        import prometheus_client
    except ImportError as exc:
        from .errors import ConfigurationError

        raise ConfigurationError("metrics need: pip install 'bssagent[metrics]'") from exc
    _metrics = _Metrics(registry if registry is not None else prometheus_client.REGISTRY)


def enable_tracing(tracer_provider: Any = None, *, record_thread_ids: bool = False) -> None:
    """Emit spans through ``tracer_provider`` (default: OpenTelemetry's global one).

    Args:
        tracer_provider: An OpenTelemetry ``TracerProvider``.
        record_thread_ids: Put the thread id on spans (``bssagent.thread_id``). Off by
            default: thread ids are the keys to conversations.

    Raises:
        ConfigurationError: ``opentelemetry-api`` is not installed.
    """
    global _tracer, _thread_ids
    try:
        from opentelemetry import trace
    except ImportError as exc:
        from .errors import ConfigurationError

        raise ConfigurationError("tracing needs: pip install 'bssagent[otel]'") from exc
    _tracer = trace.get_tracer("bssagent", tracer_provider=tracer_provider)
    _thread_ids = record_thread_ids


def disable() -> None:
    """Stop recording metrics and spans (metrics stay registered where they were)."""
    global _metrics, _tracer
    _metrics = _tracer = None


# -- hooks (called by the library) ------------------------------------------------------------


def log_fields(event: str, **fields: Any) -> dict[str, Any]:
    """``extra=`` for a log record: ``bssagent_event`` and ``bssagent_<field>`` attributes,
    which structured (JSON) formatters emit as fields. Never message content or passwords:
    callers pass ids, counts, error class names and redacted locations only."""
    return {"bssagent_event": event, **{f"bssagent_{k}": v for k, v in fields.items()}}


def span(
    name: str, thread_id: str | None = None, *, current: bool = True, **attributes: Any
) -> Any:
    """A span (a no-op context manager while tracing is off); ``attributes`` are prefixed
    with ``bssagent.``. The span's ``outcome`` is ``error`` when the block raises.

    ``current=False`` does not make it the current span: for generators, which may be
    resumed or closed in another context than the one they started in.
    """
    if _tracer is None:
        return nullcontext()
    return _span(name, thread_id, current, attributes)


@contextmanager
def _span(
    name: str, thread_id: str | None, current: bool, attributes: dict[str, Any]
) -> Iterator[Any]:
    attrs = {f"bssagent.{k}": v for k, v in attributes.items() if v is not None}
    if _thread_ids and thread_id is not None:
        attrs["bssagent.thread_id"] = thread_id
    if current:
        opened = _tracer.start_as_current_span(name, attributes=attrs)
    else:
        opened = _ended(_tracer.start_span(name, attributes=attrs))
    with opened as active:
        try:
            yield active
        except Exception as exc:
            active.set_attribute("bssagent.outcome", "error")
            active.set_attribute("bssagent.error", type(exc).__name__)
            raise
        active.set_attribute("bssagent.outcome", "ok")


@contextmanager
def _ended(started: Any) -> Iterator[Any]:
    try:
        yield started
    finally:
        started.end()


def session_resolved(namespace: str, started: float, *, hit: bool, created: bool) -> None:
    if _metrics is not None:
        cache = "hit" if hit else "miss"
        _metrics.lookup.labels(namespace, cache).observe(time.perf_counter() - started)
        if created:
            _metrics.created.labels(namespace).inc()


def session_created(namespace: str) -> None:
    if _metrics is not None:
        _metrics.created.labels(namespace).inc()


def session_ended(namespace: str, status: str, count: int = 1) -> None:
    if _metrics is not None and count:
        if status == "expired":
            _metrics.expired.labels(namespace).inc(count)
        else:
            _metrics.ended.labels(namespace, status).inc(count)


def run_finished(agent: str, started: float, *, error: bool) -> None:
    if _metrics is not None:
        _metrics.runs.labels(agent, "error" if error else "ok").inc()
        _metrics.run_seconds.labels(agent).observe(time.perf_counter() - started)


def lock_waited(agent: str, seconds: float) -> None:
    if _metrics is not None:
        _metrics.lock_wait.labels(agent).observe(seconds)


def degraded(component: str, on: bool) -> None:
    if _metrics is not None:
        _metrics.degraded.labels(component).set(1 if on else 0)
        _metrics.transitions.labels(component, "degraded" if on else "ok").inc()


def maintained(namespace: str, task: str, count: int) -> None:
    if _metrics is not None and count:
        _metrics.maintenance.labels(namespace, task).inc(count)


def journal(component: str, outcome: str, count: int = 1) -> None:
    if _metrics is not None and count:
        _metrics.journal.labels(component, outcome).inc(count)
