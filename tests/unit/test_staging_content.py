"""StagingContent: how an incremental fan-out run without watermarks tells a changed record."""

from __future__ import annotations

from hashlib import sha256

import numpy as np

from producers.page_publisher import StagingContent, fingerprint, pair_fingerprint


def _h(text: str) -> bytes:
    return sha256(text.encode()).digest()[:16]


def _content(mine: dict[str, bytes], others: list[str]) -> StagingContent:
    pairs = np.sort(np.array([pair_fingerprint(k, h) for k, h in mine.items()], dtype=np.int64))
    return StagingContent(pairs, np.sort(np.array([fingerprint(k) for k in others], dtype=np.int64)))


def test_fingerprint_is_postgres_md5_bit64() -> None:
    # PostgreSQL's ('x' || left(md5(t), 16))::bit(64)::bigint: the first 16 hex digits, two's complement
    # (that the database agrees: the quiet verification in tests/integration/test_extract_fanout_content.py)
    from hashlib import md5

    want = int(md5(b"cc1:42").hexdigest()[:16], 16)
    assert fingerprint("cc1:42") == (want - (1 << 64) if want >= 1 << 63 else want)


def test_new_and_changed_records_count_same_and_uncomparable_ones_do_not() -> None:
    c = _content({"cc1:1": _h("a"), "cc1:2": _h("b")}, others=["cc1:9"])
    assert c.changed(["cc1:1", "cc1:2"], [_h("a"), _h("b")]) == 0           # as staged
    assert c.changed(["cc1:1", "cc1:2"], [_h("a"), _h("B")]) == 1           # another content
    assert c.changed(["cc1:3"], [_h("c")]) == 1                             # not staged: new
    assert c.changed(["cc1:9"], [_h("z")]) == 0                             # another job's row / no hash
    assert c.changed([], []) == 0
    assert StagingContent(np.zeros(0, np.int64), np.zeros(0, np.int64)).changed(["cc1:1"], [_h("a")]) == 1
