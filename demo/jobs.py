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

Shutting down (:meth:`TrainingJobs.close`) cancels every job and waits a bounded time for the
running step to end. A step can outlast that wait (a class image of a large base on a slow
device), and the trainer thread is a daemon, so at exit its ``finally`` blocks never run: close
then marks the job cancelled itself and runs the clean-ups the job registered with
:meth:`Reporter.on_abandon` (the service deletes the run's validation images), and the job writes
nothing more once cancelled.

Messages a job shows are for the web page: server paths in them are hidden (:func:`hide_paths`);
the server log keeps the full text.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from gen.errors import BespokeError

log = logging.getLogger(__name__)
MAX_CURVE_POINTS = 2000  # loss points kept per job for the plot
HIDDEN_PATH = "[server path]"
# An absolute path (POSIX, ~/ or a Windows drive) not inside a word or a URL; it ends at a space,
# a quote, a bracket, a separator or a colon, and a trailing full stop is the sentence's.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:~?/|[A-Za-z]:[\\/])[^\s'\"()<>|,;:]+(?<![.])")


def hide_paths(text: str, roots: Iterable[str | os.PathLike] = ()) -> str:
    """``text`` with every server path replaced by ``[server path]``, for a message shown on the web page.

    Errors from the registry, the trainer and the OS name files (the registry index, a cache or temp
    folder, the outputs folder): the page's user needs what went wrong, not where the server keeps
    things. ``roots`` (and the home and temp folders) are matched first, so a path with spaces in
    a known folder goes whole; any other absolute path goes up to its first space.
    """
    known = {os.fspath(r) for r in (*roots, os.path.expanduser("~"), tempfile.gettempdir()) if r and len(os.fspath(r)) > 1}
    for root in sorted(known, key=len, reverse=True):
        # Whole names only: /srv/reg is no part of /var/srv/reg or of /srv/registry.
        text = re.sub(r"(?<![\w.~-])" + re.escape(root.rstrip("/\\")) + r"(?![^\s'\"()<>|,;:./\\])(?:[/\\][^\s'\"()<>|,;:]*)?(?<![.])", HIDDEN_PATH, text)
    return _ABSOLUTE_PATH.sub(HIDDEN_PATH, text)


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


@dataclass
class Job:
    """A job as the trainer thread sees it: its request, its live status and its cancel flag.

    ``request`` is dropped once the job finishes: each user's latest job is kept for their pages,
    and its request holds the decoded photos (up to 20 of 40 MP each).
    """

    status: JobStatus
    request: Any
    cancel: threading.Event = field(default_factory=threading.Event)
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # run by close() if the job does not stop in time


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

    def on_abandon(self, cleanup: Callable[[], None]) -> None:
        """Have ``cleanup`` run if the app shuts down before this job stops (its own ``finally`` never runs then)."""
        self._job.cleanups.append(cleanup)


RunFn = Callable[[Any, Reporter], int]  # trains one request, returns the registered version


class TrainingJobs:
    """Queue and run training jobs one at a time; remember each user's latest job."""

    def __init__(self, run: RunFn, public: Callable[[str], str] = hide_paths):
        self._run = run
        self._public = public  # a failure's message as the page shows it (server paths hidden)
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
        """Cancel everything and stop the trainer thread, waiting at most ``timeout`` seconds for the running step.

        A job still running then is marked cancelled here and its :meth:`Reporter.on_abandon`
        clean-ups run: the thread is a daemon, so at exit it would stop where it is, its
        ``finally`` blocks unrun. It writes nothing more (it is cancelled), and a registry write
        it is inside finishes first as long as the registry is closed after this.
        """
        with self._cond:
            self._closed = True
            for job in list(self._queue):
                self._finish(job, JobState.CANCELLED, "the app is shutting down")
            self._queue.clear()
            for job in self._latest.values():
                job.cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return
        with self._cond:
            stuck = [job for job in self._latest.values() if job.status.state is JobState.RUNNING]
            for job in stuck:
                self._finish(job, JobState.CANCELLED, "cancelled: the app shut down during training")
        for job in stuck:
            log.warning("training job %s did not stop within %g s of shutting down; cancelled, its files removed", job.status.id, timeout)
            for cleanup in job.cleanups:
                try:
                    cleanup()
                except Exception:  # one failed clean-up must not stop the others, nor the shutdown
                    log.exception("cleaning up training job %s", job.status.id)

    # --- the trainer thread ---

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                request = job.request  # read under the lock: finishing a job drops it
                self._set(job, state=JobState.RUNNING, phase="starting", queue_position=0)
                self._renumber()
            try:
                version = self._run(request, Reporter(self, job))
            except JobCancelled:
                self._finish_locked(job, JobState.CANCELLED, "cancelled; nothing was registered")
            except BespokeError as e:
                log.warning("training job %s failed: %s", job.status.id, e)  # the full message; the page's hides paths
                self._finish_locked(job, JobState.FAILED, self._public(str(e)))
            except Exception as e:  # a bug: keep the app alive, log the trace, tell the user something went wrong
                log.exception("training job %s failed", job.status.id)
                self._finish_locked(job, JobState.FAILED, f"internal error ({type(e).__name__}); see the server log")
            else:
                with self._cond:
                    self._set(job, version=version)
                self._finish_locked(job, JobState.DONE, f"registered as version {version}", after_close=True)
            finally:
                del request

    # --- status changes (under the condition's lock) ---

    def _set(self, job: Job, **changes: Any) -> None:
        job.status = replace(job.status, revision=job.status.revision + 1, **changes)
        self._cond.notify_all()

    def _update(self, job: Job, **changes: Any) -> None:
        with self._cond:
            self._set(job, **changes)

    def _finish(self, job: Job, state: JobState, message: str) -> None:
        job.request = None  # the photos: only the status is kept for the user's pages
        self._set(job, state=state, message=message)

    def _finish_locked(self, job: Job, state: JobState, message: str, *, after_close: bool = False) -> None:
        """Finish ``job``, unless close() already marked it cancelled; ``after_close``: even then (it did register)."""
        with self._cond:
            if job.status.state.finished and not after_close:
                log.info("training job %s, cancelled at shutdown, ended: %s", job.status.id, message)
                return
            self._finish(job, state, message)

    def _renumber(self) -> None:
        for position, job in enumerate(self._queue):
            if job.status.queue_position != position + 1:
                self._set(job, queue_position=position + 1)
