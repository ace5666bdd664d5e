"""The Optuna study: its storage (RDBStorage with heartbeats), sampler, and the worker loop.

Claiming is Optuna's: `study.ask()` creates a trial or pops a WAITING one atomically in the
database. A worker that dies stops its heartbeat; after the grace period any other worker's
`fail_stale_trials` (run by `study.optimize` before each trial) fails that trial and
`RetryHeartbeatStaleTrialCallback` re-queues its parameters as a WAITING trial, which the next
`ask()` pops. A SQLite study's workers are all processes of this machine, so a RUNNING trial whose
worker process is gone is failed the same way at once (a killed search resumes without waiting
out the grace period).

The global trial count: a trial is *done* when COMPLETE, or FAIL with a reason of its own (a
build or device error; a dead worker's trial is retried instead). A worker stops when the study
has `trials` done; when the rest are running elsewhere it waits for them (they may die and come
back as WAITING). Two workers asking at the same moment for the last trial: the later number
gives way (FAIL, reason "surplus"), so the count is exact.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgepackError, MissingExtra

DIRECTIONS = ["maximize", "minimize", "minimize"]
METRIC_NAMES = ["metric", "latency_ms", "size_mb"]


def optuna():
    try:
        import optuna as _optuna
    except ImportError as e:
        raise MissingExtra("edgepack search needs optuna", "pip install -c constraints.txt optuna") from e
    _optuna.logging.set_verbosity(_optuna.logging.ERROR)  # edgepack reports every trial itself
    warnings.filterwarnings("ignore", category=_optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    return _optuna


def driver_url(url: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; with only psycopg2 installed (the
    `postgres` extra), name that driver instead."""
    scheme, sep, rest = url.partition("://")
    if scheme == "postgresql" and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2{sep}{rest}"
    return url


def open_storage(url: str, heartbeat_s: int, grace_s: int, max_retry: int):
    opt = optuna()
    url = driver_url(url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 120}}  # several worker processes write the one file
    else:
        engine = {"pool_pre_ping": True}
    try:
        for attempt in range(3):
            try:
                return opt.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                    heartbeat_stale_trial_callback=opt.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry))
            except Exception as e:  # two workers making a new database's tables at once: the loser retries
                if attempt == 2 or "already exists" not in str(e):
                    raise
                time.sleep(1 + attempt)
    except ImportError as e:
        driver = "psycopg2-binary" if "postgres" in url else "PyMySQL" if "mysql" in url else e.name
        raise MissingExtra(f"the storage {url.split(':', 1)[0]} needs a database driver: {e}",
                           f"pip install -c constraints.txt {driver}  (or edgepack[postgres])") from e
    except Exception as e:  # sqlalchemy.exc.OperationalError and friends: say which database
        from .config import redact
        raise EdgepackError(f"cannot open the study storage {redact(url)}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}",
                            "check that the database server runs and the URL's user, host and database exist") from e


def make_sampler(kind: str, seed: int | None, trials: int):
    opt = optuna()
    if kind == "nsga2":
        return opt.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, trials // 4)))
    if kind == "random":
        return opt.samplers.RandomSampler(seed=seed)
    # constant_liar: running trials count as bad guesses, so parallel workers spread out.
    return opt.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=max(2, min(10, trials // 4)))


def open_study(name: str, storage, sampler, meta: dict, create: bool = True):
    """Create the study or join it; a study made for another space or target is refused."""
    opt = optuna()
    if not create:
        try:
            return opt.load_study(study_name=name, storage=storage, sampler=sampler)
        except KeyError as e:
            names = [s.study_name for s in opt.get_all_study_summaries(storage)]
            raise EdgepackError(f"no study {name!r} in that storage (studies: {', '.join(names) or 'none'})",
                                "pass --storage URL (and --out DIR) as the search was run") from e
    study = opt.create_study(study_name=name, storage=storage, sampler=sampler, directions=DIRECTIONS,
                             load_if_exists=True)
    known = study.user_attrs.get("edgepack")
    if known is None:
        study.set_user_attr("edgepack", meta)
        study.set_metric_names(METRIC_NAMES)
    elif known.get("space") != meta["space"] or known.get("target") != meta["target"]:
        raise EdgepackError(f"study {name!r} was made for target {known.get('target')} with another search space",
                            "give this search its own --study name, or the same target and [search] table")
    return study


@dataclass
class Tally:
    done: int = 0
    running: int = 0
    waiting: int = 0


def counts_as_done(t) -> bool:
    state = t.state.name
    return state == "COMPLETE" or (state == "FAIL" and bool(t.user_attrs.get("reason"))
                                   and not t.user_attrs.get("surplus"))


def tally(study, before: int | None = None, exclude: int | None = None) -> Tally:
    """Done / running / waiting trials (those numbered below `before`, if given)."""
    out = Tally()
    for t in study.get_trials(deepcopy=False):
        if (before is not None and t.number >= before) or t.number == exclude:
            continue
        if counts_as_done(t):
            out.done += 1
        elif t.state.name == "RUNNING":
            out.running += 1
        elif t.state.name == "WAITING":
            out.waiting += 1
    return out


def is_surplus(study, number: int, trials: int) -> bool:
    t = tally(study, before=number)
    return t.done + t.running + t.waiting >= trials


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _alive(worker: str) -> bool:
    host, _, rest = worker.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's worker: only its heartbeat can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started in ("?", _start_time(int(pid)))  # a reused pid is another process


def reap_dead_local(study) -> list[int]:
    """Fail (and re-queue, through the storage's own callback) the RUNNING trials of worker
    processes of this machine that no longer exist: what fail_stale_trials does after the grace
    period, done now because the death is certain."""
    opt = optuna()
    storage = study._storage
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(opt.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if not worker or _alive(worker):
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=opt.trial.TrialState.FAIL):
                reaped.append(t.number)
                callback = storage.get_heartbeat_stale_trial_callback()
                if callback is not None:
                    callback(study, copy.deepcopy(storage.get_trial(t._trial_id)))
        except opt.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    return reaped


class TrialFailed(Exception):
    """A trial that ran and failed for a reason of its own (it counts toward the trials)."""


class Surplus(Exception):
    """A trial asked for after the study had its count: it gives way, it is not run."""


def work(study, trials: int, objective, *, poll_s: float, local_storage: bool, say, should_stop=lambda: False,
         on_done=None) -> None:
    """Run trials until the study has `trials` done (counting every worker's); `on_done(n)` hears
    the study's count of trials done before each new one (the progress bar)."""
    opt = optuna()
    waited = False

    def guarded(trial):
        values = objective(trial)
        # Failed under us by another worker: raise rather than return, which Optuna cannot tell.
        if study._storage.get_trial(trial._trial_id).state.is_finished():
            raise opt.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was finished by another worker")
        return values

    while not should_stop():
        if local_storage:
            for n in reap_dead_local(study):
                say(f"trial {n}: its worker process is gone; re-queued")
        opt.storages.fail_stale_trials(study)
        t = tally(study)
        if on_done is not None:
            on_done(t.done)
        if t.done >= trials:
            return
        if t.waiting == 0 and t.done + t.running >= trials:
            if not waited:
                say(f"{t.done} of {trials} trials done, {t.running} running in other workers: waiting for them")
                waited = True
            time.sleep(poll_s)
            continue
        waited = False
        try:
            study.optimize(guarded, n_trials=1, catch=(TrialFailed, Surplus), gc_after_trial=False)
        except (opt.exceptions.UpdateFinishedTrialError, ValueError) as e:
            # Its trial was failed under it (no heartbeat within the grace period, say a paused
            # machine): Optuna refuses the late result, and the re-queued retry stands instead.
            if not isinstance(e, opt.exceptions.UpdateFinishedTrialError) and "Cannot tell a" not in str(e):
                raise
            say("a trial of this worker was declared dead by another worker (no heartbeat within the grace "
                "period); its retry stands instead")
