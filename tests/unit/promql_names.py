"""Helpers for tests that cross-check PromQL (dashboard panels, alert rules) against the metric
families ``common/metrics.py`` declares.

Not a PromQL parser: it strips what is not a series name (strings, label matchers, ranges,
grouping clauses, function calls, keywords, numbers) and returns what is left, which in a
well-formed expression is exactly the series names. The tests then require each name to be one
the code exports, with the client library's suffix rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: labels Prometheus adds to every scraped series (job/instance) plus our relabelled service label
TARGET_LABELS = {"job", "instance", "service"}
#: series not exported by TrialSync that queries may use
EXTERNAL_SERIES = {"up": {"job", "instance", "service"}}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan", "atan2"}
_IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(rf"({_IDENT})?\s*\{{([^}}]*)\}}")
_MATCHER = re.compile(rf"({_IDENT})\s*(=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")


@dataclass
class Family:
    name: str
    kind: str
    labels: frozenset[str]
    series: dict[str, frozenset[str]] = field(default_factory=dict)


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name TrialSync's metric families expose -> the label names it carries."""
    from prometheus_client.metrics import MetricWrapperBase

    import common.metrics as m

    out: dict[str, frozenset[str]] = {}
    for obj in vars(m).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        name, kind, labels = obj._name, obj._type, frozenset(obj._labelnames)  # noqa: SLF001
        if kind == "counter":
            out[name + "_total"] = labels
            out[name + "_created"] = labels
        elif kind == "gauge":
            out[name] = labels
        elif kind == "histogram":
            out[name + "_bucket"] = labels | {"le"}
            out[name + "_count"] = labels
            out[name + "_sum"] = labels
            out[name + "_created"] = labels
        elif kind == "summary":
            out[name] = labels | {"quantile"}
            out[name + "_count"] = labels
            out[name + "_sum"] = labels
        else:  # pragma: no cover - info/enum are not used
            out[name] = labels
    return out


@dataclass
class Analysis:
    names: set[str]
    #: (series name or "", label) pairs used in selectors
    matcher_labels: set[tuple[str, str]]
    grouping_labels: set[str]


def analyse(expr: str) -> Analysis:
    """Series names and label names used by one PromQL expression."""
    matcher_labels: set[tuple[str, str]] = set()
    text = _STRING.sub('""', expr)
    for m in _SELECTOR.finditer(text):
        for lm in _MATCHER.finditer(m.group(2)):
            matcher_labels.add((m.group(1) or "", lm.group(1)))
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    text = _RANGE.sub(" ", text)
    grouping: set[str] = set()
    for g in _GROUPING.finditer(text):
        grouping |= {x.strip() for x in g.group(2).split(",") if x.strip()}
    text = _GROUPING.sub(" ", text)
    names = set()
    for tok in re.finditer(rf"(?<![\w$.]){_IDENT}(?![\w])(\s*\()?", text):
        word = tok.group(0).rstrip("( \t")
        if tok.group(1) or word in KEYWORDS:
            continue
        if re.fullmatch(r"[eE]\d*|\d+[smhdwy]", word):
            continue
        names.add(word)
    return Analysis(names, matcher_labels, grouping)


def problems(expr: str, where: str, exported: dict[str, frozenset[str]]) -> list[str]:
    """Everything wrong with ``expr``: unknown series, or labels no series in it carries."""
    known = {**exported, **EXTERNAL_SERIES}
    a = analyse(expr)
    out = []
    if not a.names:
        out.append(f"{where}: no series name found in {expr!r}")
    for n in sorted(a.names):
        if n not in known:
            out.append(f"{where}: {n!r} is not a metric TrialSync exports")
    available = set(TARGET_LABELS)
    for n in a.names:
        available |= set(known.get(n, ()))
    for series, label in sorted(a.matcher_labels):
        labels = set(known.get(series, available)) | TARGET_LABELS if series else available
        if label not in labels and label != "__name__":
            out.append(f"{where}: label {label!r} is not on {series or 'any series of the expression'}")
    for label in sorted(a.grouping_labels):
        if label not in available:
            out.append(f"{where}: grouping label {label!r} is not on any series of the expression")
    return out
