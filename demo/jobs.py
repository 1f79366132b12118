"""Background training jobs: one trainer thread, a queue, and per-user status that outlives the page.

A training run takes minutes; a browser tab can be refreshed or closed meanwhile. So the demo
never trains inside a request: it submits a job here and the page *watches* it. The job belongs to
the user, not to the page, so a refreshed page (or a second tab) finds it again and shows its
progress, loss curve and validation images from where it is.

One thread trains, one job at a time (training is the heaviest thing the app does, and on one
GPU two jobs would only slow each other down); other users' jobs wait in order and say so.
Generation never waits for training: it runs on another base instance in request threads.

Cancelling sets a flag that the trainer's progress callback checks at every step (and every class
image): it raises :class:`JobCancelled`, which unwinds training through its ``finally`` blocks,
giving the borrowed base back untouched, and nothing is registered.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from gen.errors import BespokeError

log = logging.getLogger(__name__)
MAX_CURVE_POINTS = 2000  # loss points kept per job for the plot


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobCancelled(BespokeError):
    """Raised inside the trainer when its user cancelled the job."""


class JobRefused(BespokeError):
    """A job cannot be submitted (the user already has one queued or running)."""


@dataclass(frozen=True)
class JobStatus:
    """A consistent snapshot of one job, safe to read from any thread."""

    id: str
    user: str
    concept: str
    state: JobState
    phase: str = "waiting"
    step: int = 0
    total: int = 0
    losses: tuple[tuple[int, float], ...] = ()
    validations: tuple[tuple[int, tuple[str, ...]], ...] = ()  # (step, image paths the app wrote)
    message: str = ""
    version: int | None = None  # the registered version, once done
    queue_position: int = 0  # jobs ahead of this one while queued
    revision: int = 0  # grows with every change, so watchers know when to redraw
    submitted_at: float = field(default_factory=time.time)
    finished_at: float | None = None


@dataclass
class Job:
    """A job as the trainer thread sees it: its request, its live status and its cancel flag."""

    status: JobStatus
    request: Any
    cancel: threading.Event = field(default_factory=threading.Event)


class Reporter:
    """What a running job calls: progress, losses, validation images. Raises :class:`JobCancelled` when cancelled."""

    def __init__(self, jobs: TrainingJobs, job: Job):
        self._jobs, self._job = jobs, job

    @property
    def job_id(self) -> str:
        return self._job.status.id

    def check(self) -> None:
        if self._job.cancel.is_set():
            raise JobCancelled("cancelled")

    def progress(self, step: int, total: int, info: dict) -> None:
        """The trainer's ``progress(step, total, info)`` callback."""
        phase = str(info.get("phase", "working"))
        changes: dict[str, Any] = {"phase": phase, "step": int(step), "total": int(total)}
        if phase == "train" and "loss" in info:
            losses = self._job.status.losses + ((int(step), float(info["loss"])),)
            changes["losses"] = losses[-MAX_CURVE_POINTS:]
        self._jobs._update(self._job, **changes)
        self.check()

    def phase(self, phase: str) -> None:
        self._jobs._update(self._job, phase=phase, step=0, total=0)
        self.check()

    def validation(self, step: int, paths: list[str]) -> None:
        self._jobs._update(self._job, validations=self._job.status.validations + ((int(step), tuple(paths)),))

    def discard_validations(self) -> None:
        """Forget the validation images (their files are being deleted), so no page asks for them."""
        self._jobs._update(self._job, validations=())


RunFn = Callable[[Any, Reporter], int]  # trains one request, returns the registered version


class TrainingJobs:
    """Queue and run training jobs one at a time; remember each user's latest job."""

    def __init__(self, run: RunFn):
        self._run = run
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._latest: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._thread = threading.Thread(target=self._worker, name="bespoke-trainer", daemon=True)
        self._thread.start()

    # --- for request threads ---

    def submit(self, user: str, concept: str, request: Any) -> JobStatus:
        """Queue a job for ``user``; refused while they already have one queued or running."""
        with self._cond:
            if self._closed:
                raise JobRefused("the trainer is shutting down")
            current = self._latest.get(user)
            if current is not None and not current.status.state.finished:
                raise JobRefused(f"you already have a training job ({current.status.concept!r}, {current.status.state.value}); wait for it or cancel it first")
            job = Job(JobStatus(id=f"job{next(self._ids):05d}", user=user, concept=concept, state=JobState.QUEUED), request)
            self._queue.append(job)
            self._latest[user] = job
            self._renumber()
            self._cond.notify_all()
            return job.status

    def cancel(self, user: str) -> JobStatus | None:
        """Cancel ``user``'s queued or running job; returns its status (None when there is nothing to cancel)."""
        with self._cond:
            job = self._latest.get(user)
            if job is None or job.status.state.finished:
                return None
            job.cancel.set()
            if job.status.state is JobState.QUEUED:
                self._queue.remove(job)
                self._finish(job, JobState.CANCELLED, "cancelled before it started")
                self._renumber()
            else:
                self._set(job, message="cancelling at the next step...")
            return job.status

    def latest(self, user: str) -> JobStatus | None:
        with self._cond:
            job = self._latest.get(user)
            return None if job is None else job.status

    def wait(self, user: str, after_revision: int, timeout: float) -> JobStatus | None:
        """``user``'s latest job once its revision passes ``after_revision`` (or after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                job = self._latest.get(user)
                if job is not None and (job.status.revision > after_revision or job.status.state.finished):
                    return job.status
                left = deadline - time.monotonic()
                if left <= 0:
                    return None if job is None else job.status
                self._cond.wait(left)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the trainer thread."""
        with self._cond:
            self._closed = True
            for job in list(self._queue):
                self._finish(job, JobState.CANCELLED, "the app is shutting down")
            self._queue.clear()
            for job in self._latest.values():
                job.cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout)

    # --- the trainer thread ---

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                self._set(job, state=JobState.RUNNING, phase="starting", queue_position=0)
                self._renumber()
            try:
                version = self._run(job.request, Reporter(self, job))
            except JobCancelled:
                self._finish_locked(job, JobState.CANCELLED, "cancelled; nothing was registered")
            except BespokeError as e:
                self._finish_locked(job, JobState.FAILED, str(e))
            except Exception as e:  # a bug: keep the app alive, log the trace, tell the user something went wrong
                log.exception("training job %s failed", job.status.id)
                self._finish_locked(job, JobState.FAILED, f"internal error ({type(e).__name__}); see the server log")
            else:
                with self._cond:
                    self._set(job, version=version)
                self._finish_locked(job, JobState.DONE, f"registered as version {version}")

    # --- status changes (under the condition's lock) ---

    def _set(self, job: Job, **changes: Any) -> None:
        job.status = replace(job.status, revision=job.status.revision + 1, **changes)
        self._cond.notify_all()

    def _update(self, job: Job, **changes: Any) -> None:
        with self._cond:
            self._set(job, **changes)

    def _finish(self, job: Job, state: JobState, message: str) -> None:
        self._set(job, state=state, message=message, finished_at=time.time())

    def _finish_locked(self, job: Job, state: JobState, message: str) -> None:
        with self._cond:
            self._finish(job, state, message)

    def _renumber(self) -> None:
        for position, job in enumerate(self._queue):
            if job.status.queue_position != position + 1:
                self._set(job, queue_position=position + 1)
