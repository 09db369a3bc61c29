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


def test_background_writes_in_order_one_at_a_time_off_the_caller_thread():
    import contextvars
    import threading
    import time

    run = contextvars.ContextVar("run", default=None)
    run.set("flow-run-1")  # stands for Prefect's run context: the writer must see the caller's
    written, threads, seen, active, overlaps = [], set(), set(), [0], []

    def write(items):
        active[0] += 1
        overlaps.append(active[0])
        time.sleep(0.02)  # slow enough that the caller would start the next commit while this one runs
        threads.add(threading.get_ident())
        seen.add(run.get())
        written.append(list(items))
        active[0] -= 1

    groups = CommitGroups(write, rows=2, seconds=3600, background=True)
    for i in range(9):
        groups.add(i, 1)
    groups.flush()
    assert written == [[0, 1], [2, 3], [4, 5], [6, 7], [8]] and groups.commits == 5
    assert threading.get_ident() not in threads and seen == {"flow-run-1"}
    assert max(overlaps) == 1  # never two writes at once
    assert groups._pool is None  # the writer thread ended with the flush


def test_background_write_error_is_raised_and_nothing_after_it_is_written():
    calls = []

    def write(items):
        calls.append(list(items))
        if items[0] == 0:
            raise OSError("disk full")

    groups = CommitGroups(write, rows=1, seconds=3600, background=True)
    groups.add(0, 1)  # the failing write runs on the writer thread
    with pytest.raises(OSError, match="disk full"):
        groups.add(1, 1)  # the next commit waits for it first, and raises its error
    assert calls == [[0]]
    groups.close()  # nothing in flight: returns, the writer thread ends
    assert groups._pool is None


def test_close_lands_the_write_in_flight_without_committing_what_is_pending():
    import threading

    release, written = threading.Event(), []

    def write(items):
        release.wait(5)
        written.append(list(items))

    groups = CommitGroups(write, rows=2, seconds=3600, background=True)
    for i in range(3):
        groups.add(i, 1)  # [0, 1] is being written; [2] is pending
    assert written == []
    release.set()
    groups.close()  # a caller stopping on an error: the group in flight lands, the pending one stays "to do"
    assert written == [[0, 1]] and groups.pending == [2]
