"""Faults on demand: per endpoint pattern, by probability or exact count, reproducible from the seed.

Grammar (``--faults SPEC`` and ``POST /_sim/faults``; full description in simulator/README.md)::

    SPEC    := RULE ( ';' RULE )*
    RULE    := KIND [ '@' PATTERN ] ( ',' KEY '=' VALUE )*
    KIND    := 429 | 500 | 502 | 503 | reset | latency | drip | truncate | malformed | no_id | duplicate
    PATTERN := a glob (fnmatch) on the route template or on the concrete path; default '*'
    KEY     := p | count | after | ms | jitter_ms | retry_after | chunks

Examples: ``429@/api/v1/patients/*,p=0.1,retry_after=2``; ``reset@*/elements/odata,count=3``;
``latency,ms=200,jitter_ms=100``; ``duplicate@/api/v1/patient-visits/odata,count=1,after=2``.

Decisions: rule *i* numbers its matching requests n = 0, 1, 2, …; request n is eligible when
``n >= after`` and fewer than ``count`` faults fired, and fires when hash(seed, i, kind, pattern, n)
< p. So the same seed, the same rules and the same sequence of requests give the same faults
(setting the same rules again restarts the same sequence). ``latency`` rules add up; of
the other kinds the first rule that fires decides the response.
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from simulator.data import key_of, mix64

STATUS_KINDS = ("429", "500", "502", "503")
BODY_KINDS = ("drip", "truncate", "malformed")
RECORD_KINDS = ("no_id", "duplicate")
KINDS = (*STATUS_KINDS, "reset", "latency", *BODY_KINDS, *RECORD_KINDS)
_INT_KEYS = ("count", "after", "ms", "jitter_ms", "chunks")
_FLOAT_KEYS = ("p", "retry_after")


class FaultSpecError(ValueError):
    """A fault specification that cannot be parsed; the message says what is wrong and the fix."""


@dataclass
class FaultRule:
    kind: str
    pattern: str = "*"
    p: float = 1.0
    count: int | None = None
    after: int = 0
    ms: int = 0
    jitter_ms: int = 0
    retry_after: float = 1.0
    chunks: int = 10
    # runtime counters
    seen: int = field(default=0, compare=False)
    fired: int = field(default=0, compare=False)

    def matches(self, template: str, path: str) -> bool:
        return self.pattern == "*" or fnmatch.fnmatchcase(template, self.pattern) or fnmatch.fnmatchcase(
            path, self.pattern)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FaultDecision:
    latency_s: float = 0.0
    kind: str | None = None  # the response fault, if any
    rule: FaultRule | None = None
    salt: int = 0  # per-decision hash for choices inside the fault (which record, where to cut)


def parse_faults(spec: str | None) -> list[FaultRule]:
    """Parse the SPEC grammar above into rules."""
    rules: list[FaultRule] = []
    if not spec or not spec.strip():
        return rules
    for raw in spec.split(";"):
        raw = raw.strip()
        if not raw:
            continue
        head, *opts = [x.strip() for x in raw.split(",")]
        kind, _, pattern = head.partition("@")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise FaultSpecError(f"unknown fault kind {kind!r} in {raw!r}: use one of {', '.join(KINDS)}")
        rule = FaultRule(kind=kind, pattern=pattern.strip() or "*")
        for opt in opts:
            key, eq, value = opt.partition("=")
            key = key.strip().lower()
            if not eq:
                raise FaultSpecError(f"fault option {opt!r} in {raw!r} is not key=value")
            if key not in _INT_KEYS + _FLOAT_KEYS:
                raise FaultSpecError(f"unknown fault option {key!r} in {raw!r}: use {', '.join(_INT_KEYS + _FLOAT_KEYS)}")
            try:
                setattr(rule, key, int(value) if key in _INT_KEYS else float(value))
            except ValueError:
                raise FaultSpecError(f"fault option {key}={value!r} in {raw!r} is not a number") from None
        if not 0.0 <= rule.p <= 1.0:
            raise FaultSpecError(f"p={rule.p} in {raw!r}: a probability is between 0 and 1")
        if (rule.count is not None and rule.count < 0) or rule.after < 0 or rule.ms < 0 or rule.jitter_ms < 0:
            raise FaultSpecError(f"negative number in {raw!r}")
        if rule.kind == "latency" and rule.ms == 0 and rule.jitter_ms == 0:
            raise FaultSpecError(f"latency rule {raw!r} needs ms=<milliseconds> and/or jitter_ms=<milliseconds>")
        if rule.kind == "drip" and rule.ms == 0:
            rule.ms = 2000
        rules.append(rule)
    return rules


def rules_from_json(items: list[dict[str, Any]]) -> list[FaultRule]:
    """Rules given as JSON objects (admin API): same keys as the SPEC grammar, plus ``kind``/``pattern``."""
    parts = []
    for it in items:
        if not isinstance(it, dict) or "kind" not in it:
            raise FaultSpecError("each fault rule is an object with at least a 'kind'")
        head = f"{it['kind']}@{it.get('pattern', '*')}"
        opts = [f"{k}={v}" for k, v in it.items() if k not in ("kind", "pattern") and v is not None]
        parts.append(",".join([head, *opts]))
    return parse_faults(";".join(parts))


class FaultInjector:
    """Holds the active rules and decides, per request, which fault (if any) to inject."""

    def __init__(self, seed: int, rules: list[FaultRule] | None = None):
        self.seed = seed
        self.rules: list[FaultRule] = list(rules or [])
        self._lock = threading.Lock()
        self.injected: dict[str, int] = {}

    def set(self, rules: list[FaultRule], append: bool = False) -> None:
        with self._lock:
            self.rules = [*self.rules, *rules] if append else list(rules)

    def clear(self) -> None:
        self.set([])

    def decide(self, template: str, path: str) -> FaultDecision | None:
        if not self.rules:
            return None
        dec = FaultDecision()
        hit = False
        with self._lock:
            for i, r in enumerate(self.rules):
                if not r.matches(template, path):
                    continue
                n = r.seen
                r.seen += 1
                if n < r.after or (r.count is not None and r.fired >= r.count):
                    continue
                if r.kind != "latency" and dec.kind is not None:
                    continue
                h = mix64(key_of(self.seed, "fault", i, r.kind, r.pattern) ^ n)
                if r.p < 1.0 and (h >> 11) * (1.0 / (1 << 53)) >= r.p:
                    continue
                r.fired += 1
                hit = True
                self.injected[r.kind] = self.injected.get(r.kind, 0) + 1
                if r.kind == "latency":
                    jitter = (mix64(h) % (r.jitter_ms + 1)) if r.jitter_ms else 0
                    dec.latency_s += (r.ms + jitter) / 1000.0
                else:
                    dec.kind, dec.rule, dec.salt = r.kind, r, mix64(h ^ 0x51)
        return dec if hit else None

    def unfire(self, dec: FaultDecision) -> None:
        """Take back a record fault that found no record to act on (so ``count`` stays exact)."""
        if dec.rule is None:
            return
        with self._lock:
            dec.rule.fired -= 1
            self.injected[dec.rule.kind] -= 1
        dec.kind, dec.rule = None, None

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.describe() for r in self.rules]
