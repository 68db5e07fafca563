"""The one generation thread of a server process, its bounded queue and the progress it reports.

Two ONNX Runtime runs sharing the same cores are slower than one after the other, so a process runs
one job at a time: HTTP handlers `submit` jobs and wait on their futures; the worker thread takes
them in order. The queue is bounded: `submit` raises `Busy` when `max_queue` jobs already wait, and
the server answers 429 with Retry-After instead of letting memory and latency grow. A job whose
client went away is `cancel`led: dropped if it still waits, interrupted at its next step if it runs.

Only the worker thread touches the loaded Pipeline (and switches models, between jobs), so a model
switch can never race a running generation. What `/progress` reads lives in `Progress`, written by
the worker under a lock and read as a snapshot.
"""

from __future__ import annotations

import base64
import collections
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from sdonnx.errors import SdonnxError
from sdonnx.runtime.metadata import png_bytes

DRAIN_SECONDS = 30.0  # at shutdown, how long the running job may take before it is interrupted
WATCH_SECONDS = 5.0  # previews are made while /progress asked for an image this recently
PREVIEW_SECONDS = 0.5  # and at most this often (one VAE decode each for models without latent_rgb)


class Busy(SdonnxError):
    """The queue is full; `retry_after` is the seconds until a slot is likely free."""

    def __init__(self, queued: int, retry_after: int):
        self.queued, self.retry_after = queued, retry_after
        super().__init__(f"server busy: {queued} jobs are waiting (the --max-queue limit); retry in {retry_after} s")


class Stopping(SdonnxError):
    """The server is shutting down and takes no more jobs."""


@dataclass(eq=False)
class Job:
    """`run(worker)` executes on the worker thread; its result or exception lands in `future`."""

    run: Callable[[Worker], Any]
    label: str
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.time)


@dataclass
class Progress:
    """The running job as A1111's `state` describes it: iteration job_no of job_count, step of steps."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    step: int = 0
    steps: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    timestamp: str = "0"
    current_image: str | None = None  # base64 PNG of a recent step's x0 estimate, while someone watches


class Worker:
    """Runs jobs one at a time on its own thread; at most `max_queue` wait behind the running one."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._current: Job | None = None
        self._progress = Progress()
        self._stopping = False
        self._durations: collections.deque[float] = collections.deque(maxlen=16)
        self._watched = self._previewed = -math.inf  # when /progress last asked for an image; the last preview
        self._thread = threading.Thread(target=self._loop, name="sdonnx-worker", daemon=True)
        self._thread.start()

    def check_room(self) -> None:
        """Busy if the queue is full, Stopping after shutdown began: what a request asks before its
        checks, so a full server turns requests away without spending cores on them."""
        with self._lock:
            self._check_room()

    def submit(self, run: Callable[[Worker], Any], label: str) -> Job:
        """Queue `run`; Busy when the queue is full, Stopping after shutdown began."""
        with self._lock:
            self._check_room()
            job = Job(run, label)
            self._pending.append(job)
            self._lock.notify()
            return job

    def cancel(self, job: Job) -> None:
        """Drop `job` if it waits; interrupt it if it runs (its client is gone)."""
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
                job.future.cancel()
            elif job is self._current:
                self._progress.interrupted = True

    def interrupt(self) -> None:
        """A1111's /interrupt: stop the running job at its next step (what it finished is kept)."""
        with self._lock:
            if self._current is not None:
                self._progress.interrupted = True

    def skip(self) -> None:
        """A1111's /skip: abandon the running job's current iteration and go on with the next."""
        with self._lock:
            if self._current is not None:
                self._progress.skipped = True

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    def progress(self, *, watch: bool = False) -> tuple[Progress, int]:
        """A copy of the running job's progress, and how many jobs wait. watch: the caller wants step
        previews; the worker makes them (at most one per PREVIEW_SECONDS) while callers keep asking."""
        with self._lock:
            if watch:
                self._watched = time.monotonic()
            return Progress(**vars(self._progress)), len(self._pending)

    # Called by jobs, on the worker thread.
    def begin(self, job_count: int, steps: int) -> None:
        with self._lock:
            self._progress.job_count, self._progress.steps = job_count, steps

    def next_iteration(self, job_no: int) -> bool:
        """Start iteration `job_no`; False when the job was interrupted (stop now)."""
        with self._lock:
            self._progress.job_no, self._progress.step, self._progress.skipped = job_no, 0, False
            return not self._progress.interrupted

    def on_step(self, step: int, sigma: float, latents, preview=None) -> bool:
        """The pipeline's step callback (previews=True): record the step, and a preview when someone
        watches; False stops the run (interrupt or skip)."""
        now = time.monotonic()
        image = None
        if preview is not None and now - self._watched < WATCH_SECONDS and now - self._previewed >= PREVIEW_SECONDS:
            self._previewed = now
            image = base64.b64encode(png_bytes(preview()[0])).decode("ascii")
        with self._lock:
            self._progress.step = step + 1
            if image is not None:
                self._progress.current_image = image
            return not (self._progress.interrupted or self._progress.skipped)

    @property
    def interrupted(self) -> bool:
        with self._lock:
            return self._progress.interrupted

    def stop_accepting(self) -> None:
        """Refuse new jobs and cancel the waiting ones; the running one goes on."""
        with self._lock:
            self._stopping = True
            while self._pending:
                self._pending.popleft().future.cancel()
            self._lock.notify_all()

    def shutdown(self, timeout: float = DRAIN_SECONDS) -> None:
        """Stop accepting, let the running job finish for `timeout` seconds, then interrupt it;
        returns when the worker thread has stopped."""
        self.stop_accepting()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.interrupt()
            self._thread.join()

    def _check_room(self) -> None:
        if self._stopping:
            raise Stopping("the server is shutting down")
        if len(self._pending) + (self._current is not None) > self.max_queue:  # 0: none may wait
            raise Busy(len(self._pending), self._retry_after())

    def _retry_after(self) -> int:
        """Seconds until the queue has likely moved by one: the median of recent job durations."""
        durations = sorted(self._durations)
        return max(1, round(durations[len(durations) // 2])) if durations else 1

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                if not self._pending:
                    return
                job = self._pending.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue
                self._current = job
                stamp = time.strftime("%Y%m%d%H%M%S")
                self._progress = Progress(job=job.label, job_count=1, started=time.time(), timestamp=stamp)
            started = time.monotonic()
            try:
                result = job.run(self)
            except BaseException as e:  # the job's error belongs to its client; the worker goes on
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            with self._lock:
                self._durations.append(time.monotonic() - started)
                self._current = None
                self._progress = Progress()
