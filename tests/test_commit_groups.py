"""CommitGroups: per-batch results are committed in groups by row count and by time, and nothing is left behind."""

from __future__ import annotations

import pytest

from flows.enrich import CommitGroups


def test_groups_by_rows_and_flushes_the_rest():
    written: list[list[int]] = []
    groups = CommitGroups(lambda items: written.append(list(items)), rows=100, seconds=3600)
    for i in range(7):
        groups.add(i, 40)  # 40 rows per batch: a commit every third batch
    assert written == [[0, 1, 2], [3, 4, 5]] and groups.pending == [6]
    groups.flush()
    groups.flush()  # nothing pending: no empty commit
    assert written == [[0, 1, 2], [3, 4, 5], [6]] and groups.commits == 3


def test_groups_by_time(monkeypatch):
    import flows.enrich as enrich_mod

    clock = iter([0.0, 1.0, 12.0, 13.0, 30.0, 31.0])
    monkeypatch.setattr(enrich_mod.time, "perf_counter", lambda: next(clock))
    written: list[list[str]] = []
    groups = CommitGroups(lambda items: written.append(list(items)), rows=10**6, seconds=10)  # t=0
    groups.add("a", 1)  # t=1: under 10 s
    groups.add("b", 1)  # t=12: 12 s since the start -> commit (clock restarts at 13)
    groups.add("c", 1)  # t=30: 17 s since -> commit
    assert written == [["a", "b"], ["c"]]


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="rows >= 1"):
        CommitGroups(lambda items: None, rows=0)
