"""kontext_data.workers: the one process pool (CPU count, errors as results, bounded window, order, inline = pool),
and the one --shard parser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kontext_data.problems import ProblemsError
from kontext_data.workers import (Shard, ShardError, WorkerError, available_cpus, chunked, map_chunks, parse_shard,
                                  resolve_workers, run_items)

REPO = Path(__file__).resolve().parents[2]


# Item functions live at module level: the spawned processes import them by name.


def square_or_fail(x: int) -> int:
    if x % 5 == 3:
        raise ValueError(f"item {x} is bad")
    return x * x


def slow_first(x: int) -> int:
    """Early items take longest, so completion order differs from input order."""
    time.sleep(0.02 * max(0, 6 - x))
    return x


def unpicklable_value(x: int):
    return (lambda: x) if x == 2 else x


def environment(_x: int) -> tuple[str | None, str | None]:
    return os.environ.get("OPENCV_FOR_THREADS_NUM"), os.environ.get("MKL_NUM_THREADS")


def die_on_three(x: int) -> int:
    if x == 3:
        os._exit(1)  # a worker killed mid-item (as by the OOM killer)
    return x


GREETING: list[str] = []


def set_greeting(text: str) -> None:
    if text == "fail":
        raise RuntimeError("no greeting today")
    GREETING[:] = [text]


def greet(x: int) -> str:
    return f"{GREETING[0]} {x}"


def sum_chunk(chunk) -> list[int]:
    return [x + 1 for x in chunk]


def broken_chunk(chunk) -> list[int]:
    raise RuntimeError("chunk exploded")


def test_cpu_count_follows_the_affinity_mask_not_the_host():
    assert available_cpus() == len(os.sched_getaffinity(0))
    assert resolve_workers(0) == resolve_workers(None) == available_cpus()
    # a process confined to one CPU (taskset, a Slurm cpuset, a container) starts one worker
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from kontext_data.workers import available_cpus, resolve_workers; "
            "print(available_cpus(), resolve_workers(0, 100))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["1", "1"]


def test_resolve_workers_caps_at_items_and_skips_small_runs():
    assert resolve_workers(8, 3) == 3
    assert resolve_workers(8, 0) == 1
    assert resolve_workers(4, 47, pool_min_items=48) == 1
    assert resolve_workers(4, 48, pool_min_items=48) == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_an_item_error_becomes_a_result_never_an_exception(workers):
    results = list(run_items(square_or_fail, range(10), workers))
    assert sorted(r.index for r in results) == list(range(10))
    failed = {r.index: r.error for r in results if not r.ok}
    assert set(failed) == {3, 8}
    assert failed[3].type == "ValueError" and str(failed[3]) == "ValueError: item 3 is bad"
    assert {r.index: r.value for r in results if r.ok} == {i: i * i for i in range(10) if i not in (3, 8)}


def test_inline_and_pool_give_the_same_results():
    items = list(range(23))
    inline = sorted(run_items(square_or_fail, items, 1), key=lambda r: r.index)
    pooled = sorted(run_items(square_or_fail, items, 2), key=lambda r: r.index)
    parent = sorted(run_items(square_or_fail, items, 2, parent_works=True), key=lambda r: r.index)
    assert inline == pooled == parent
    assert [r.item for r in pooled] == items  # each result carries the caller's own item


@pytest.mark.parametrize("parent_works", [False, True])
def test_ordered_results_come_in_input_order(parent_works):
    results = list(run_items(slow_first, range(12), 2, ordered=True, parent_works=parent_works))
    assert [r.index for r in results] == list(range(12))
    assert [r.value for r in results] == list(range(12))
    unordered = list(run_items(slow_first, range(12), 2))
    assert sorted(r.value for r in unordered) == list(range(12))


@pytest.mark.parametrize("ordered", [False, True])
def test_at_most_window_items_are_in_flight(ordered):
    pulled = 0

    def source():
        nonlocal pulled
        for i in range(40):
            pulled += 1
            yield i

    handed = 0
    for _ in run_items(slow_first, source(), 2, window=3, ordered=ordered):
        assert pulled - handed <= 3  # taken from the source but not yet handed back (this one included)
        handed += 1
    assert handed == 40


def test_pool_problems_are_results_too(tmp_path):
    results = {r.index: r for r in run_items(unpicklable_value, range(4), 2)}
    assert [results[i].value for i in (0, 1, 3)] == [0, 1, 3]
    assert not results[2].ok and results[2].error.type  # the value could not travel back: reported, not raised
    died = {r.index: r for r in run_items(die_on_three, range(8), 2, window=2)}
    assert sorted(died) == list(range(8))  # no hang, every item answered
    assert not died[3].ok and "ended abruptly" in died[3].error.message
    assert all(r.value == i for i, r in died.items() if r.ok)


def test_workers_start_single_threaded_but_keep_what_the_user_set(monkeypatch):
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    monkeypatch.delenv("OPENCV_FOR_THREADS_NUM", raising=False)
    values = {r.value for r in run_items(environment, range(4), 2)}
    assert values == {("1", "3")}


@pytest.mark.parametrize("workers", [1, 2])
def test_the_initializer_prepares_every_process_that_runs_items(workers):
    results = run_items(greet, range(4), workers, initializer=set_greeting, initargs=("hello",), parent_works=True)
    assert sorted(r.value for r in results) == ["hello 0", "hello 1", "hello 2", "hello 3"]


def test_a_worker_that_cannot_start_reports_it_for_every_item():
    results = list(run_items(greet, range(3), 2, initializer=set_greeting, initargs=("fail",)))
    assert len(results) == 3 and not any(r.ok for r in results)
    assert all("could not start: no greeting today" in r.error.message for r in results)


def test_progress_and_chunks():
    seen = []
    list(run_items(square_or_fail, [1, 2, 4], 1, progress=lambda done, total: seen.append((done, total))))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    chunks = chunked(list(range(10)), 4)
    assert [list(c) for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    counts = []
    for workers in (1, 2):
        assert sorted(map_chunks(sum_chunk, chunks, workers, counts.append)) == list(range(1, 11))
    assert sorted(counts) == [2, 2, 4, 4, 4, 4]
    with pytest.raises(WorkerError, match="chunk exploded"):
        list(map_chunks(broken_chunk, chunks, 2))


@pytest.mark.parametrize("when", ["while the workers start", "after a result"])
def test_ctrl_c_stops_the_pool_cleanly(tmp_path, when):
    script = tmp_path / "interrupt.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from kontext_data.workers import run_items
        from test_workers import slow_first
        if __name__ == "__main__":
            try:
                print("ready", flush=True)
                for result in run_items(slow_first, [0] * 1000, 2):
                    print("result", flush=True)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(130)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    if when == "after a result":
        assert proc.stdout.readline().strip() == "result"
    else:
        time.sleep(0.3)  # the spawned processes are importing their modules now
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in out
    assert "Traceback" not in err, err  # the worker processes leave quietly, even one still starting


def test_parse_shard_one_format_for_every_verb():
    assert parse_shard("2/4") == Shard(2, 4) == (2, 4)
    assert parse_shard(" 0 / 3 ") == (0, 3)
    assert parse_shard(None) == parse_shard("") == Shard(0, 1)
    assert str(Shard(1, 4)) == "1/4" and Shard(1, 4).holds(5) and not Shard(1, 4).holds(4)
    for bad in ("4/4", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(ShardError) as err:
            parse_shard(bad)
        assert isinstance(err.value, ProblemsError) and err.value.usage
        assert f"--shard {bad!r}" in str(err.value) and "0 <= K < N" in str(err.value)
