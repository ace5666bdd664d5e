"""A search worker: joins the study and runs trials until it has its count.

`python -m edgepack.search.worker SPEC.json` is one worker process of a fleet search (one per
device); `run_worker` is the same in this process. Progress goes to stderr, prefixed with the
device, so a `--json` caller's stdout stays one JSON document.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..config import BuildConfig
from ..lifetime import die_with_parent
from ..pipeline import resolve_profile
from .config import SearchConfig, is_sqlite
from .objective import TrialRunner
from .study import make_sampler, open_storage, open_study, work

DEVICE_FAILURES_IN_A_ROW = 2  # then the worker gives its device up; the other workers go on


def run_worker(spec: dict, say, on_done=None) -> int:
    """Run trials on spec["device"] (None: this host). Returns the trials this worker finished.
    `on_done(n)`: the study's count of trials done, each time it is read."""
    cfg = BuildConfig.model_validate(spec["build"])
    scfg = SearchConfig.model_validate(spec["search"])
    profile = resolve_profile(cfg)
    storage = open_storage(spec["url"], scfg.heartbeat_s, scfg.grace_s, scfg.max_retry)
    study = open_study(spec["study"], storage, make_sampler(scfg.sampler, spec.get("seed"), scfg.trials), spec["meta"])
    if study.user_attrs.get("edgepack", {}).get("trials") not in (None, scfg.trials):
        say(f"note: the study was started for {study.user_attrs['edgepack']['trials']} trials; "
            f"this worker stops at {scfg.trials}")
    runner = TrialRunner(cfg, profile, spec["space"], scfg.trials, Path(spec["search_dir"]), scfg.trial_minutes,
                         spec.get("device"), say)
    work(study, scfg.trials, runner, poll_s=scfg.poll_s, local_storage=is_sqlite(spec["url"]), say=say,
         should_stop=lambda: runner.device_failures >= DEVICE_FAILURES_IN_A_ROW, on_done=on_done)
    if runner.device_failures >= DEVICE_FAILURES_IN_A_ROW:
        say(f"device {spec.get('device')} failed {runner.device_failures} trials in a row: this worker stops, "
            "the others go on")
    return len(runner.finished)


def run_fleet(spec: dict, devices: list[str], sdir: Path, say) -> list[str]:
    """One worker process per device, all on the one study; returns notes on workers that failed."""
    workers = []
    for i, device in enumerate(devices):
        seed = None if spec.get("seed") is None else spec["seed"] + i  # same seed: same first guesses
        path = sdir / f"worker-{device}.json"
        path.write_text(json.dumps({**spec, "device": device, "seed": seed}))
        workers.append((device, subprocess.Popen([sys.executable, "-m", __name__, str(path)], stdout=sys.stderr,
                                                 stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)))
        say(f"worker for {device} started (pid {workers[-1][1].pid})")
    notes = []
    try:
        for device, proc in workers:
            rc = proc.wait()
            if rc != 0:
                notes.append(f"the worker for {device} exited with {rc}: its trial, if any, is retried by the others")
    finally:
        for _, proc in workers:
            if proc.poll() is None:
                proc.terminate()
    return notes


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    prefix = f"[{spec.get('device') or 'host'}] "

    def say(msg: str) -> None:
        print(prefix + msg, file=sys.stderr, flush=True)

    from ..errors import EdgepackError
    try:
        sys.stdout = sys.stderr  # whatever a library prints stays out of the caller's JSON
        run_worker(spec, say)
    except EdgepackError as e:
        say(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
