"""PromQL of a Grafana dashboard, checked and evaluated against real /metrics scrapes, for
tests (there is no Prometheus here).

promql-parser (a maintained Rust PromQL parser with Python bindings) parses each expression;
this module checks that every metric and label it references exists in a scrape, and
evaluates the subset tandem's dashboard uses over two scrapes taken `dt` seconds apart:
selectors (instant values from the later scrape), rate() / increase() over a range (the
difference between the scrapes, / dt for rate: Prometheus extrapolates to the window's edges,
which scales numerator and denominator of a ratio alike), sum/min/max/avg by/without,
arithmetic between vectors (one-to-one on all labels, or on()/ignoring()) and scalars, and
histogram_quantile (Prometheus' linear interpolation within the bucket). Anything else
raises Unsupported, so a panel can never pass unevaluated.

Glossary: a *sample* is one line of a scrape (metric name, labels, value); a *vector* is
[(labels, value)], labels without __name__; Grafana's template variables are substituted
before parsing ($__rate_interval -> 5m, $target -> .*).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import promql_parser as pp
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs
Vector = list[tuple[Labels, float]]

TEMPLATE_VARS = {"$__rate_interval": "5m", "${target}": ".*", "$target": ".*"}


class Unsupported(ValueError):
    """An expression outside the evaluated subset."""


@dataclass(frozen=True)
class Scrape:
    """One /metrics text: {sample name: {labels: value}}."""

    samples: dict[str, dict[Labels, float]]

    @staticmethod
    def parse(text: str) -> Scrape:
        out: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = float(s.value)
        return Scrape(out)

    def label_names(self, metric: str) -> set[str]:
        return {name for labels in self.samples.get(metric, {}) for name, _ in labels}


def substitute(expr: str) -> str:
    for var, value in TEMPLATE_VARS.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target (rows' nested panels too) and query variable."""
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            if not match:
                raise Unsupported(f"variable {var['name']}: {query}")
            yield f"variable {var['name']}", f"group by ({match[2]}) ({match[1]})"


def reference_errors(expr: str, scrape: Scrape) -> list[str]:
    """Metrics and matcher labels `expr` names that the scrape does not have (or its syntax
    error); an empty list when every reference resolves."""
    try:
        tree = pp.parse(substitute(expr))
    except Exception as exc:  # noqa: BLE001 - the parser's own error type
        return [f"does not parse: {exc}"]
    errors = []
    for vs in selectors(tree):
        if vs.name not in scrape.samples:
            errors.append(f"metric {vs.name} is not in the scrape")
            continue
        have = scrape.label_names(vs.name)
        errors += [f"{vs.name} has no label {m.name!r}" for m in vs.matchers.matchers if m.name not in have]
    return errors


def selectors(node) -> Iterator[pp.VectorSelector]:
    if isinstance(node, pp.VectorSelector):
        yield node
    elif isinstance(node, pp.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, pp.Call):
        for arg in node.args:
            yield from selectors(arg)
    elif isinstance(node, pp.BinaryExpr):
        yield from selectors(node.lhs)
        yield from selectors(node.rhs)
    elif isinstance(node, (pp.AggregateExpr, pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
        yield from selectors(node.expr)


class Evaluator:
    """Evaluates expressions over (earlier, later) scrapes taken `dt` seconds apart."""

    def __init__(self, earlier: Scrape, later: Scrape, dt: float) -> None:
        self.earlier, self.later, self.dt = earlier, later, dt

    def __call__(self, expr: str) -> Vector | float:
        return self.eval(pp.parse(substitute(expr)))

    def eval(self, node) -> Vector | float:
        if isinstance(node, pp.NumberLiteral):
            return float(node.val)
        if isinstance(node, pp.ParenExpr):
            return self.eval(node.expr)
        if isinstance(node, pp.UnaryExpr):
            value = self.eval(node.expr)
            return -value if isinstance(value, float) else [(k, -v) for k, v in value]
        if isinstance(node, pp.VectorSelector):
            return self._select(self.later, node)
        if isinstance(node, pp.Call):
            return self._call(node)
        if isinstance(node, pp.AggregateExpr):
            return self._aggregate(node)
        if isinstance(node, pp.BinaryExpr):
            return self._binary(node)
        raise Unsupported(f"{type(node).__name__}: {node}")

    @staticmethod
    def _select(scrape: Scrape, vs: pp.VectorSelector) -> Vector:
        if vs.offset is not None or vs.at is not None:
            raise Unsupported("offset / @")
        out = []
        for labels, value in scrape.samples.get(vs.name, {}).items():
            if all(_matches(m, dict(labels).get(m.name, "")) for m in vs.matchers.matchers):
                out.append((labels, value))
        return out

    def _call(self, node: pp.Call) -> Vector:
        name = node.func.name
        if name in ("rate", "increase"):
            (matrix,) = node.args
            if not isinstance(matrix, pp.MatrixSelector):
                raise Unsupported(f"{name} of {type(matrix).__name__}")
            before = dict(self._select(self.earlier, matrix.vector_selector))
            delta = [(k, v - before.get(k, 0.0)) for k, v in self._select(self.later, matrix.vector_selector)]
            return delta if name == "increase" else [(k, v / self.dt) for k, v in delta]
        if name == "histogram_quantile":
            phi, inner = node.args
            return histogram_quantile(float(self.eval(phi)), self._vector(inner))
        raise Unsupported(f"function {name}")

    def _vector(self, node) -> Vector:
        value = self.eval(node)
        if isinstance(value, float):
            raise Unsupported("a scalar where a vector is needed")
        return value

    def _aggregate(self, node: pp.AggregateExpr) -> Vector:
        op = str(node.op)
        if op not in ("sum", "min", "max", "avg", "group") or node.param is not None:
            raise Unsupported(f"aggregation {op}")
        groups: dict[Labels, list[float]] = {}
        mod = node.modifier
        for labels, value in self._vector(node.expr):
            d = dict(labels)
            if mod is None:
                key: Labels = ()
            elif str(mod.type).endswith("By"):
                key = tuple(sorted((n, d[n]) for n in mod.labels if n in d))
            else:
                key = tuple(sorted((n, v) for n, v in d.items() if n not in mod.labels))
            groups.setdefault(key, []).append(value)
        reduce = {"sum": sum, "min": min, "max": max, "avg": lambda v: sum(v) / len(v), "group": lambda v: 1.0}[op]
        return [(k, float(reduce(v))) for k, v in groups.items()]

    def _binary(self, node: pp.BinaryExpr) -> Vector | float:
        op = str(node.op)
        fn = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": _divide}.get(op)
        if fn is None:
            raise Unsupported(f"operator {op}")
        lhs, rhs = self.eval(node.lhs), self.eval(node.rhs)
        if isinstance(lhs, float) and isinstance(rhs, float):
            return fn(lhs, rhs)
        if isinstance(rhs, float):
            return [(k, fn(v, rhs)) for k, v in lhs]
        if isinstance(lhs, float):
            return [(k, fn(lhs, v)) for k, v in rhs]
        mod = node.modifier
        if mod is not None and (mod.card is not None and "OneToOne" not in str(mod.card)):
            raise Unsupported("group_left / group_right")
        matching = mod.matching if mod is not None else None

        def key(labels: Labels) -> Labels:
            if matching is None:
                return labels
            names = set(matching.labels)
            if str(matching.type).endswith("Include"):  # on(...)
                return tuple((n, v) for n, v in labels if n in names)
            return tuple((n, v) for n, v in labels if n not in names)

        right = {key(k): v for k, v in rhs}
        return [(key(k), fn(v, right[key(k)])) for k, v in lhs if key(k) in right]


def _divide(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.copysign(math.inf, a)
    return a / b


def _matches(matcher: pp.Matcher, value: str) -> bool:
    op = str(matcher.op)
    if op.endswith("NotEqual"):
        return value != matcher.value
    if op.endswith("Equal"):
        return value == matcher.value
    hit = re.fullmatch(matcher.value, value) is not None  # PromQL regexes are anchored
    return not hit if op.endswith("NotRe") else hit


def histogram_quantile(phi: float, buckets: Vector) -> Vector:
    """Prometheus' histogram_quantile over cumulative `le` buckets, per label set."""
    series: dict[Labels, list[tuple[float, float]]] = {}
    for labels, count in buckets:
        d = dict(labels)
        le = float(d.pop("le"))
        series.setdefault(tuple(sorted(d.items())), []).append((le, count))
    out = []
    for labels, points in series.items():
        points.sort()
        total = points[-1][1]
        if not math.isinf(points[-1][0]) or total == 0:
            out.append((labels, math.nan))
            continue
        rank = phi * total
        lower, below = 0.0, 0.0
        for le, count in points:
            if count >= rank:
                if math.isinf(le):
                    value = lower  # the quantile is past the last finite bound: that bound
                else:
                    value = lower + (le - lower) * (rank - below) / (count - below) if count > below else le
                out.append((labels, value))
                break
            lower, below = le, count
    return out


def as_dict(vector: Iterable[tuple[Labels, float]], *labels: str) -> dict:
    """{value of `labels` (a tuple when several): sample value}."""
    out = {}
    for k, v in vector:
        d = dict(k)
        out[tuple(d[n] for n in labels) if len(labels) > 1 else d[labels[0]]] = v
    return out
