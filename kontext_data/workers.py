"""The one process pool of kontext_data: every parallel verb (split, degrade, check, preview, pair's header scan)
runs its items through :func:`run_items`, or :func:`map_chunks` for work cut into chunks.

In: a picklable function, an iterable of items, a worker count. Out: one :class:`WorkResult` per item (its value,
or the error its function raised), streamed as the items complete or in input order.

The policy, set here once for every verb:

* Worker count: ``0``/``None`` means every CPU this process may run on (:func:`available_cpus`: the affinity mask a
  container or a Slurm job grants, not the host's CPU count); never more processes than items
  (:func:`resolve_workers`). ``workers == 1`` runs the items in the calling process: no processes at all.
* Processes are started with ``spawn`` (no fork of a parent that holds threads, open files or pyarrow/OpenCV state).
  The function is sent once to each process, not with every item.
* Bounded in-flight work: at most ``window`` items (default :data:`WINDOW_PER_WORKER` per process) are taken from
  the input and not yet handed back, so memory stays flat however many items a source yields.
* Threads and memory: each worker process starts with one OpenMP/MKL/OpenBLAS/OpenCV thread (:data:`THREAD_ENV`,
  set before it imports anything; a variable the user exported is kept): the parallelism is the processes. It
  ignores SIGINT from its start (the parent handles Ctrl-C; a Ctrl-C while a process still imports its modules
  prints no traceback). It raises glibc's malloc thresholds (:func:`tune_malloc`): image buffers of up to 64 MiB
  are reused instead of being returned to the OS after every image, whose page faults cost ~20% of a JPEG round
  trip on our machines. The calling process does the same while it runs items itself (OpenCV at one thread only
  when the caller says its items use OpenCV, and only while they run).
* Errors: an item whose function raises comes back as a result carrying the error's type and text; nothing is
  raised across the process boundary. A worker process that dies (killed, out of memory) fails the items that were
  in flight, and a fresh pool takes the rest.
* ``parent_works=True``: the calling process is one of the ``workers`` and runs items between collecting results
  (it starts at once while the spawned processes still import their modules, so short runs scale too).
* Ctrl-C (KeyboardInterrupt) or a caller that stops iterating: no new item is handed out; the processes finish the
  one or two items already handed to them (their writes stay whole) and exit.

Shards: :func:`parse_shard` reads ``--shard K/N`` for every verb into a :class:`Shard`; each verb decides which of
its items a shard holds (row index, or a hash of the path).

Torch-free and light: numpy/OpenCV are imported only when a caller asks for OpenCV settings.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
from collections.abc import Sized
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, NamedTuple, Sequence, TypeVar

from kontext_data.problems import ProblemsError

T = TypeVar("T")
R = TypeVar("R")

WAIT_S = 0.1
"""While waiting for results, how often the pool looks for a Ctrl-C (it is deferred while its own code runs)."""
WINDOW_PER_WORKER = 4
"""Items in flight per worker process: enough to keep each busy while results travel back, few enough that memory
does not grow with the input."""
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "OPENCV_FOR_THREADS_NUM": "1"}
"""Environment every worker process starts with, unless the variable is already set."""
MALLOC_TRIM_THRESHOLD = 256 << 20
"""glibc M_TRIM_THRESHOLD: free heap memory kept (not returned to the OS) up to this many bytes."""
MALLOC_MMAP_THRESHOLD = 64 << 20
"""glibc M_MMAP_THRESHOLD: allocations below this size come from the heap (reused), not from fresh mmap pages."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


# --------------------------------------------------------------------------------------------- CPU count


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask a container, ``taskset`` or a Slurm job grants (the host's
    count only where the platform has no affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(requested: int | None, items: int | None = None, *, pool_min_items: int = 0) -> int:
    """Processes to use: ``requested`` (0 or None: :func:`available_cpus`), at most one per item, and 1 when fewer
    than ``pool_min_items`` items would not repay starting a pool."""
    if items is not None and items < pool_min_items:
        return 1
    n = requested or available_cpus()
    if items is not None:
        n = min(n, items)
    return max(1, n)


# --------------------------------------------------------------------------------------------- settings


def tune_malloc() -> None:
    """Set this process's glibc malloc thresholds (:data:`MALLOC_TRIM_THRESHOLD`, :data:`MALLOC_MMAP_THRESHOLD`);
    no effect off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
        libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


@contextmanager
def worker_settings(opencv: bool = False) -> Iterator[None]:
    """The worker policy in the calling process while it runs items: malloc thresholds, and with ``opencv`` one
    OpenCV thread (its previous count is restored on leaving)."""
    tune_malloc()
    if not opencv:
        yield
        return
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class WorkError:
    """What an item's function raised (or why its worker could not run it): exception type name and message."""

    type: str
    message: str

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type


@dataclass(frozen=True)
class WorkResult(Generic[T, R]):
    """One item's outcome: ``value`` when its function returned, ``error`` when it raised."""

    index: int
    """Position of the item in the input."""
    item: T
    """The item as the caller gave it (the caller's own object: it never travels back from a worker)."""
    value: R | None = None
    error: WorkError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class WorkerError(ProblemsError):
    """A chunk's function raised where the caller has no per-item way to report it (see :func:`map_chunks`)."""


def _call(fn: Callable[[T], R], item: T) -> tuple[bool, Any]:
    """(True, value) or (False, WorkError): the only place an item's exception is caught."""
    try:
        return True, fn(item)
    except Exception as exc:  # noqa: BLE001 - every item failure becomes a result
        return False, WorkError(type(exc).__name__, str(exc))


def _result(index: int, item: T, outcome: tuple[bool, Any]) -> WorkResult:
    ok, value = outcome
    return WorkResult(index, item, value) if ok else WorkResult(index, item, error=value)


# --------------------------------------------------------------------------------------------- worker side

_INSTALLED: list = []  # in a worker process: [fn] once started, or [WorkError] when starting it failed


def _start_worker(env: dict[str, str], payload: bytes) -> None:
    """Initializer of every worker process: the thread environment before any import, SIGINT to the parent,
    malloc thresholds, then the function (and the caller's initializer). Never raises: a failure to start is
    reported by every item this process is given."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C that came during start-up is dropped here
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    for key, value in env.items():
        os.environ.setdefault(key, value)
    tune_malloc()
    try:
        fn, initializer, initargs = pickle.loads(payload)
        if initializer is not None:
            initializer(*initargs)
        _INSTALLED[:] = [fn]
    except Exception as exc:  # noqa: BLE001 - reported per item instead of breaking the pool
        _INSTALLED[:] = [WorkError(type(exc).__name__, f"the worker process could not start: {exc}")]


@contextmanager
def _sigint_deferred() -> Iterator[Callable[[], bool]]:
    """While the pool's own code runs, Ctrl-C only sets a flag (the block gets a function that reads it); leaving
    the block raises KeyboardInterrupt if one came. concurrent.futures' `wait` and `submit` hold the futures' and
    the pool's locks: an interrupt raised inside them can leave a lock held, and then the pool's thread, and with it
    the interpreter's exit, waits forever. Outside the main thread (where Python runs no signal handler) a no-op."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    came: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield lambda: bool(came)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if came:
        raise KeyboardInterrupt


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread: a process started inside inherits the block, so a Ctrl-C that arrives while it
    is still importing (before :func:`_start_worker` ignores SIGINT) waits instead of printing its traceback. This
    process gets such a Ctrl-C as soon as the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _run_installed(item: Any) -> tuple[bool, Any]:
    fn = _INSTALLED[0]
    if isinstance(fn, WorkError):
        return False, fn
    return _call(fn, item)


# --------------------------------------------------------------------------------------------- pool side


def run_items(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    *,
    ordered: bool = False,
    window: int | None = None,
    parent_works: bool = False,
    opencv: bool = False,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    progress: Callable[[int, int | None], None] | None = None,
    total: int | None = None,
) -> Iterator[WorkResult[T, R]]:
    """Run ``fn`` on every item and yield a :class:`WorkResult` per item (see the module docstring for the policy).

    ``fn`` (and ``initializer``) must be picklable when ``workers > 1``. ``ordered``: results in input order
    (otherwise as they complete). ``window``: items taken and not yet handed back (default
    :data:`WINDOW_PER_WORKER` per process). ``opencv``: the items call OpenCV (limits it to one thread in this process
    while they run here). ``initializer(*initargs)`` runs once in every process that runs items.
    ``progress(done, total)`` is called before each result is handed back; ``total`` defaults to ``len(items)``.
    A sized ``items`` never gets more processes than items.
    """
    if isinstance(items, Sized):
        total = len(items) if total is None else total
        workers = min(workers, max(1, len(items)))
    if workers <= 1:
        run = _run_inline(fn, items, opencv, initializer, initargs)
    else:
        run = _PoolRun(fn, items, workers, ordered=ordered, window=window, parent_works=parent_works,
                       opencv=opencv, initializer=initializer, initargs=initargs).results()
    for done, result in enumerate(run, 1):
        if progress is not None:
            progress(done, total)
        yield result


def _run_inline(fn: Callable[[T], R], items: Iterable[T], opencv: bool, initializer: Callable[..., None] | None,
                initargs: tuple) -> Iterator[WorkResult]:
    with worker_settings(opencv):
        if initializer is not None:
            initializer(*initargs)
        for index, item in enumerate(items):
            yield _result(index, item, _call(fn, item))


class _PoolRun:
    """One run of a spawn pool over a stream of items (bounded window, reorder buffer, pool restart)."""

    def __init__(self, fn: Callable, items: Iterable, workers: int, *, ordered: bool, window: int | None,
                 parent_works: bool, opencv: bool, initializer: Callable[..., None] | None, initargs: tuple):
        self.fn, self.initializer, self.initargs = fn, initializer, initargs
        self.source = enumerate(items)
        self.exhausted = False
        self.children = workers - 1 if parent_works else workers
        self.window = max(1, window or WINDOW_PER_WORKER * self.children)
        self.ordered, self.parent_works, self.opencv = ordered, parent_works, opencv
        self.payload = pickle.dumps((fn, initializer, initargs))
        self.pending: dict[Any, tuple[int, Any]] = {}  # future -> (index, item)
        self.ready: dict[int, WorkResult] = {}  # ordered mode: finished, waiting for an earlier index
        self.next_out = 0
        self.executor = None

    def _new_executor(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.children, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(dict(THREAD_ENV), self.payload))

    def _next_item(self) -> tuple[int, Any] | None:
        if self.exhausted:
            return None
        nxt = next(self.source, None)
        self.exhausted = nxt is None
        return nxt

    def _submit(self, index: int, item: Any) -> None:
        from concurrent.futures.process import BrokenProcessPool

        with _sigint_blocked():  # submit starts the worker processes (on demand)
            try:
                future = self.executor.submit(_run_installed, item)
            except BrokenProcessPool:  # a worker died: the items it held already failed; a fresh pool takes the rest
                self.executor.shutdown(wait=False, cancel_futures=True)
                self.executor = self._new_executor()
                future = self.executor.submit(_run_installed, item)
        self.pending[future] = (index, item)

    def _fill(self) -> None:
        while len(self.pending) + len(self.ready) < self.window:
            nxt = self._next_item()
            if nxt is None:
                return
            self._submit(*nxt)

    def _collect(self, block: bool, interrupted: Callable[[], bool] = lambda: False) -> list[WorkResult]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        if not self.pending:
            return []
        done, _ = wait(self.pending, timeout=0, return_when=FIRST_COMPLETED)
        while block and not done and not interrupted():  # short waits: a Ctrl-C is seen within WAIT_S
            done, _ = wait(self.pending, timeout=WAIT_S, return_when=FIRST_COMPLETED)
        out = []
        for future in sorted(done, key=lambda f: self.pending[f][0]):
            index, item = self.pending.pop(future)
            try:
                outcome = future.result()
            except BrokenProcessPool:
                outcome = (False, WorkError("WorkerDied", "the worker process holding this item ended abruptly "
                                                          "(killed, crashed or out of memory)"))
            except Exception as exc:  # noqa: BLE001 - e.g. an item or a value that cannot be pickled
                outcome = (False, WorkError(type(exc).__name__, str(exc)))
            out.append(_result(index, item, outcome))
        return out

    def _emit(self, result: WorkResult) -> Iterator[WorkResult]:
        if not self.ordered:
            yield result
            return
        self.ready[result.index] = result
        while self.next_out in self.ready:
            yield self.ready.pop(self.next_out)
            self.next_out += 1

    def _step(self, interrupted: Callable[[], bool]) -> list[WorkResult] | None:
        """Results finished now, plus one item the parent ran itself (``parent_works``); None at the end."""
        self._fill()
        finished = self._collect(block=False)
        if self.parent_works:
            nxt = self._next_item()
            if nxt is not None:
                return finished + [_result(nxt[0], nxt[1], _call(self.fn, nxt[1]))]
        if finished:
            return finished
        return self._collect(True, interrupted) if self.pending else None

    def results(self) -> Iterator[WorkResult]:
        """Every item's result; the pool is shut down however the iteration ends."""
        self.executor = self._new_executor()
        settings = worker_settings(self.opencv) if self.parent_works else nullcontext()
        clean = False
        try:
            with settings:
                if self.parent_works and self.initializer is not None:
                    self.initializer(*self.initargs)
                while True:
                    with _sigint_deferred() as interrupted:  # raises KeyboardInterrupt on leaving, if one came
                        finished = self._step(interrupted)
                    if finished is None:
                        break
                    for result in finished:
                        yield from self._emit(result)
            clean = True
        finally:
            # Ctrl-C, an error or a consumer that stopped: start nothing new, let the processes finish the item they
            # hold (its files are written whole) and exit; a normal end waits for them.
            self.executor.shutdown(wait=clean, cancel_futures=not clean)


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` cut into consecutive chunks of ``size`` (the last one shorter)."""
    return [items[k:k + size] for k in range(0, len(items), max(1, size))]


def map_chunks(fn: Callable[[Sequence[T]], list[R]], chunks: Sequence[Sequence[T]], workers: int,
               on_chunk: Callable[[int], None] | None = None, *, opencv: bool = False) -> Iterator[R]:
    """Every element of ``fn(chunk)`` (a list) for every chunk, chunk by chunk as they complete; ``on_chunk(n)``
    after each chunk with its element count. Chunk functions report their items' problems in their values; one that
    raises stops the run with :class:`WorkerError`."""
    for result in run_items(fn, chunks, workers, opencv=opencv):
        if not result.ok:
            raise WorkerError(f"{type(fn).__name__} failed on a chunk of {len(result.item)} items: {result.error}")
        if on_chunk is not None:
            on_chunk(len(result.value))
        yield from result.value


# --------------------------------------------------------------------------------------------- shards


class Shard(NamedTuple):
    """Part ``index`` of ``count`` of a run (``index`` counts from 0, as ``SLURM_ARRAY_TASK_ID`` with
    ``--array=0-(N-1)``); ``Shard(0, 1)`` is the whole run."""

    index: int = 0
    count: int = 1

    def holds(self, position: int) -> bool:
        """True when the item at ``position`` (a row index, or a hash) belongs to this shard."""
        return position % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class ShardError(ProblemsError):
    """A ``--shard`` value that is not ``K/N`` with 0 <= K < N (a usage error)."""

    usage = True


def parse_shard(text: str | None) -> Shard:
    """``"K/N"`` -> ``Shard(K, N)``; None or empty -> the whole run ``Shard(0, 1)``. Raises :class:`ShardError`."""
    if text is None or not text.strip():
        return Shard()
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ShardError(f"--shard {text!r}: give K/N with 0 <= K < N, K counting from 0 (four machines: "
                         "--shard 0/4, 1/4, 2/4 and 3/4)")
    return Shard(int(m.group(1)), int(m.group(2)))
