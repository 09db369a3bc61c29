"""CommitGroups: per-batch results are committed in groups by row count and by time, and nothing is left behind."""

from __future__ import annotations

import pytest

from flows.enrich import CommitGroups


def test_groups_by_rows_and_flushes_the_rest(clock):
    written: list[list[int]] = []
    groups = CommitGroups(lambda items: written.append(list(items)), rows=100, seconds=3600)
    for i in range(7):
        groups.add(i, 40)  # 40 rows per batch: a commit every third batch
    assert written == [[0, 1, 2], [3, 4, 5]] and groups.pending == [6]
    groups.flush()
    groups.flush()  # nothing pending: no empty commit
    assert written == [[0, 1, 2], [3, 4, 5], [6]] and groups.commits == 3


class FakeClock:
    """``time.perf_counter`` under the test's control: ``now`` moves only when the test (or a write) moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    import flows.enrich as enrich_mod

    fake = FakeClock()
    monkeypatch.setattr(enrich_mod.time, "perf_counter", fake)
    return fake


def test_groups_by_time(clock):
    written: list[list[str]] = []
    groups = CommitGroups(lambda items: written.append(list(items)), rows=10**6, seconds=10)  # t=0
    clock.now = 1.0
    groups.add("a", 1)  # under 10 s
    clock.now = 12.0
    groups.add("b", 1)  # 12 s since the start -> commit (it takes no time: the clock restarts at 12)
    clock.now = 20.0
    groups.add("c", 1)  # 8 s since
    clock.now = 23.0
    groups.add("d", 1)  # 11 s since -> commit
    assert written == [["a", "b"], ["c", "d"]]


def test_a_slow_commit_makes_the_next_one_wait_for_its_share_of_the_work(clock):
    """A commit that took 10 s (a replaceWhere rewriting its table) is followed by at least 40 s of work before
    the next one (commits stay at most 20% of the run), past the row and time triggers, up to ``max_rows``."""
    written: list[list[int]] = []

    def write(items):
        written.append(list(items))
        clock.now += 10.0  # each commit takes 10 s

    groups = CommitGroups(write, rows=100, seconds=30, max_rows=1000)
    groups.add(0, 100)  # the row trigger: commit, 10 s
    assert written == [[0]] and groups.gap == pytest.approx(40.0)
    for i in range(1, 4):  # 100 rows each, 10 s of work each: due by rows, but only 30 s of work since
        clock.now += 10.0
        groups.add(i, 100)
    assert written == [[0]]
    clock.now += 10.0
    groups.add(4, 100)  # 40 s of work since the last commit: now
    assert written == [[0], [1, 2, 3, 4]]
    for i in range(5, 15):  # fast batches: 1 s each; the cap of 1,000 pending rows commits the tenth
        clock.now += 1.0
        groups.add(i, 100)
    assert written[-1] == list(range(5, 15)) and groups.pending == []
    fast = CommitGroups(lambda items: written.append(list(items)), rows=100, seconds=30)
    fast.add("x", 100)  # a commit that takes no time adds no wait
    fast.add("y", 100)
    assert written[-2:] == [["x"], ["y"]] and fast.gap == 0.0


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="rows >= 1"):
        CommitGroups(lambda items: None, rows=0)
    with pytest.raises(ValueError, match="share=0"):
        CommitGroups(lambda items: None, share=0)
