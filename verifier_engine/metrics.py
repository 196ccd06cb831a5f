"""Prometheus text-format metrics (exposition format 0.0.4) without the prometheus_client dependency.

Counters, gauges and histograms with labels, held in a ``Registry`` per server (not module globals: two servers in
one process, as in the tests, keep separate numbers). Thread-safe: the backend thread and the event loop both write.
Also ``parse_metrics`` (the inverse, for the profiler and the tests).
"""
from __future__ import annotations

import bisect
import math
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def _labels(names, values) -> str:
    if not names:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labelnames=()):
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict) -> tuple:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_, buckets, labelnames=()):
        super().__init__(name, help_, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[tuple, list] = {}  # key -> [bucket counts..., +Inf count, sum]

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            d = self._data.setdefault(key, [0] * (len(self.buckets) + 1) + [0.0])
            d[i] += 1
            d[-1] += value

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        if not items and not self.labelnames:
            items = [((), [0] * (len(self.buckets) + 1) + [0.0])]
        lines = self.header()
        for key, d in items:
            cum = 0
            for b, c in zip(self.buckets + (math.inf,), d[:-1]):
                cum += c
                lines.append(f"{self.name}_bucket{_labels(self.labelnames + ('le',), key + (_num(b),))} {cum}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(d[-1])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {cum}")
        return lines


class Registry:
    def __init__(self):
        self._metrics: list[_Metric] = []

    def add(self, metric):
        self._metrics.append(metric)
        return metric

    def counter(self, name, help_, labelnames=()) -> Counter:
        return self.add(Counter(name, help_, labelnames))

    def gauge(self, name, help_, labelnames=()) -> Gauge:
        return self.add(Gauge(name, help_, labelnames))

    def histogram(self, name, help_, buckets, labelnames=()) -> Histogram:
        return self.add(Histogram(name, help_, buckets, labelnames))

    def render(self) -> str:
        return "\n".join(line for m in self._metrics for line in m.render()) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` from Prometheus text (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out
