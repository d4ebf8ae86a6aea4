"""Prometheus metrics written by hand: counters, gauges and histograms in the text format 0.0.4.

No client library: the format is a few lines per metric, and writing it here keeps the server's
dependencies to the ASGI stack. Every metric is thread-safe (the batch runs in a worker thread,
requests arrive on the event loop). `parse_prometheus_text` reads the format back, for tests and
for the load generator.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels, extra: Labels = ()) -> str:
    items = (*labels, *extra)
    if not items:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in items]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _fmt_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
            raise ValueError(f"metric name: expected [a-zA-Z_:][a-zA-Z0-9_:]*, got {name!r}")
        self.name, self.help = name, help_text
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted((k, str(v)) for k, v in labels.items())), 0.0)

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        lines = self.header()
        if not items:
            lines.append(f"{self.name} 0")
        lines += [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in items]
        return lines


class Gauge(_Metric):
    """A value that goes up and down (queue depth, the current operating point)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, value: float = 0.0) -> None:
        super().__init__(name, help_text)
        self._value = float(value)

    def set(self, value: float) -> None:
        self._value = float(value)

    def get(self) -> float:
        return self._value

    def render(self) -> list[str]:
        return [*self.header(), f"{self.name} {_fmt_value(self._value)}"]


class Histogram(_Metric):
    """Cumulative buckets, sum and count, as Prometheus expects."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        b = sorted(float(x) for x in buckets)
        if not b or any(y <= x for x, y in zip(b, b[1:])):
            raise ValueError(f"buckets: expected strictly increasing numbers, got {list(buckets)}")
        self.buckets = b
        self._counts = [0] * (len(b) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        i = next((j for j, ub in enumerate(self.buckets) if value <= ub), len(self.buckets))
        with self._lock:
            self._counts[i] += 1
            self._sum += float(value)

    @property
    def count(self) -> int:
        return sum(self._counts)

    @property
    def sum(self) -> float:
        return self._sum

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, acc = self.header(), 0
        for ub, c in zip([*self.buckets, math.inf], counts):
            acc += c
            lines.append(f"{self.name}_bucket{_fmt_labels((), (('le', _fmt_value(ub)),))} {acc}")
        lines += [f"{self.name}_sum {_fmt_value(total)}", f"{self.name}_count {acc}"]
        return lines


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics.values():
            lines += m.render()  # type: ignore[attr-defined]
        return "\n".join(lines) + "\n"


_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)(?:\s+\d+)?$"
)
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_prometheus_text(text: str) -> dict[str, dict[Labels, float]]:
    """Parse the text format into {name: {labels: value}}; raises ValueError on a malformed line."""
    out: dict[str, dict[Labels, float]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            if line.startswith("# TYPE") and len(line.split()) != 4:
                raise ValueError(f"line {n}: malformed TYPE comment {line!r}")
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"line {n}: expected 'name{{labels}} value', got {line!r}")
        labels: list[tuple[str, str]] = []
        raw = m.group("labels") or ""
        pos = 0
        while pos < len(raw):
            lm = _LABEL.match(raw, pos)
            if lm is None:
                raise ValueError(f"line {n}: malformed labels {raw!r}")
            labels.append((lm.group(1), lm.group(2)))
            pos = lm.end()
        v = m.group("value")
        value = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(v)
        if value is None:
            try:
                value = float(v)
            except ValueError:
                raise ValueError(f"line {n}: value {v!r} is not a number") from None
        out.setdefault(m.group("name"), {})[tuple(sorted(labels))] = value
    return out
