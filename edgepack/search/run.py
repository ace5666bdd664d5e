"""`search(build_cfg, scfg)` and `show(study)`: the search as a whole.

One worker runs here when the search has at most one device (or none: this host). With several
devices (`--devices all`), one worker process per device shares the study's storage, each
benchmarking its trials on its own device; this process waits for them and writes the results.
Processes on other machines join the same study with the same --storage and --study.
"""
from __future__ import annotations

import json
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..config import BuildConfig
from ..devices import get_device, load_inventory
from ..errors import EdgepackError
from ..pipeline import resolve_profile
from ..progress import as_progress
from ..targets import normalize_arch
from . import confirm
from . import results as res
from . import space as sp
from .config import SearchConfig, default_study, is_sqlite, redact, search_dir, storage_url, STUDY_DB
from .study import open_storage, open_study

Say = Callable[[str], None]


@dataclass
class SearchResult:
    study_name: str
    storage: str  # the URL without its password
    trials: list[dict]
    best: dict | None
    best_path: Path | None
    pareto: list[int]
    table_path: Path | None
    plot_path: Path | None
    markdown_path: Path | None = None
    search_dir: Path | None = None
    latency_note: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


def search(build_cfg: BuildConfig, scfg: SearchConfig, progress: Say | None = None) -> SearchResult:
    """Run (or resume, or join) the study until it has `scfg.trials` trials, then write the trial
    table, the trade-off plot and the best build. Raises EdgepackError for bad input; trials
    that fail are recorded with their reason and the search goes on."""
    reporter = as_progress(progress)  # None, a callable(str) or a Progress (bars on a terminal)
    say = reporter
    profile = resolve_profile(build_cfg)
    space = sp.resolve_space(scfg.space or build_cfg.search, profile, build_cfg)
    if not sp.searched(space):
        raise EdgepackError("the search space is empty: every [search] key is fixed",
                            "give at least one key a list of choices or a {low, high} range")
    study_name = scfg.study or default_study(build_cfg.name, build_cfg.model, build_cfg.target)
    sdir = search_dir(scfg.out, study_name).resolve()
    sdir.mkdir(parents=True, exist_ok=True)
    url = storage_url(scfg.model_copy(update={"out": str(Path(scfg.out).resolve())}), study_name)
    check = sdir / "trials" / ".check"  # the space applied once, so a bad key fails before any trial
    sp.apply(build_cfg, profile, sp.first_values(space), check, scfg.trial_minutes, None)
    shutil.rmtree(check, ignore_errors=True)
    devices = resolve_devices(scfg.devices, build_cfg, profile.name, profile.arch)
    note = latency_note(devices, profile.arch, build_cfg)
    say(f"study {study_name} in {redact(url)}: {scfg.trials} trials, {scfg.sampler} sampler, "
        f"{len(sp.searched(space))} searched keys ({', '.join(sp.searched(space))})")
    say(note)
    meta = {"target": profile.name, "space": space, "trials": scfg.trials}
    spec = {"build": build_cfg.model_dump(mode="json"), "search": scfg.model_dump(mode="json"), "study": study_name,
            "url": url, "space": space, "meta": meta, "search_dir": str(sdir), "seed": scfg.seed}
    notes: list[str] = []
    # Made (or joined) here first: a space that does not match the study fails before any worker starts.
    open_study(study_name, open_storage(url, scfg.heartbeat_s, scfg.grace_s, scfg.max_retry), None, meta)
    if len(devices) <= 1:
        from .worker import run_worker
        with reporter.task("search trials", total=scfg.trials) as bar:
            run_worker({**spec, "device": devices[0] if devices else None}, say,
                       on_done=lambda n: bar.update(completed=n))
    else:
        from .worker import run_fleet
        with reporter.task(f"search trials on {len(devices)} devices (their lines follow)"):
            notes += run_fleet(spec, devices, sdir, say)
    measure = confirm.measurer(build_cfg.devices_dir, bool(build_cfg.accept_new_host_key), build_cfg.latency_runs or 50)
    return finalize(study_name, url, profile.name, scfg, sdir, note, say, notes=notes, measure=measure)


def resolve_devices(names: list[str], cfg: BuildConfig, target: str, arch: str) -> list[str]:
    """`all`: every device of the target's kind in the inventory; else the names given, else the
    build's own --device, else none (this host)."""
    if names == ["all"] or names == "all":
        inventory = load_inventory(cfg.devices_dir or None, cfg.targets_dir or None, broken=[])
        picked = [d.name for d in inventory.values() if d.target == target]
        if not picked:
            raise EdgepackError(f"no device of the {target} kind in the inventory (devices: "
                                f"{', '.join(sorted(inventory)) or 'none'})",
                                "add one under devices/ (see devices/ssh-example.toml.example), or search on this "
                                "host without --devices")
        return sorted(picked)
    names = list(dict.fromkeys(names)) or ([cfg.device] if cfg.device else [])
    for n in names:  # unknown names and devices of another architecture fail now, not in every trial
        device = get_device(n, cfg.devices_dir or None, cfg.targets_dir or None)
        if device.profile().arch != arch:
            raise EdgepackError(f"device {n} is {device.profile().arch} (target {device.target!r}) but the search "
                                f"is for {target!r} ({arch})", f"search with --target {device.target}, or pick a "
                                f"device of the {target} kind")
    return names


def latency_note(devices: list[str], target_arch: str, cfg: BuildConfig) -> str:
    if devices:
        emulated = [d for d in devices if get_device(d, cfg.devices_dir or None, cfg.targets_dir or None).emulated]
        return (f"latency measured on the device(s) {', '.join(devices)}"
                + (f"; {', '.join(emulated)} emulated: its latency is not judged" if emulated else ""))
    host = normalize_arch(platform.machine())
    if host == target_arch:
        return f"no device: latency measured on this host, which has the target's architecture ({host})"
    return (f"no device: latency measured on this host ({host}), the target is {target_arch}: latency is not "
            "judged (searched as a proxy); pass --device or --devices all to judge it")


def finalize(study_name: str, url: str, target: str, scfg: SearchConfig, sdir: Path, note: str, say: Say,
             notes: list[str] | None = None, write_best: bool = True,
             measure: confirm.Measure | None = None) -> SearchResult:
    from .study import optuna
    storage = open_storage(url, scfg.heartbeat_s, scfg.grace_s, scfg.max_retry)
    study = optuna().load_study(study_name=study_name, storage=storage)
    rows = res.trial_rows(study)
    pareto = res.pareto_numbers(study)
    best, confirmed = res.best_row(rows), None
    if write_best and measure is not None:  # `show` only reads: what was confirmed is in search.json
        best, confirmed = confirm.confirm_best(rows, measure, scfg.confirm_rounds, scfg.confirm_candidates, say)
    elif not write_best:
        best, confirmed = confirm.as_confirmed(rows, best, sdir / res.SEARCH_JSON)
    data = res.summary(study_name, url, target, rows, pareto, best, note, scfg.trials, confirmed)
    table, md = res.write_tables(rows, pareto, best, sdir)
    (sdir / res.SEARCH_JSON).write_text(json.dumps(data, indent=2, default=str) + "\n")
    plot = res.write_plot(data, sdir / res.PLOT)
    notes = list(notes or [])
    best_path = None
    if best is None and confirmed:
        notes.append(f"no trial's latency held up when benchmarked again ({len(confirmed['candidates'])} candidate(s), "
                     f"{confirmed['rounds']} round(s)): no best build written (see search.json's confirm entries)")
    elif best is None:
        notes.append("no trial met every judged budget: no best build written (see the trial table)")
    elif not best["build_dir"] or not Path(best["build_dir"]).is_dir():
        notes.append(f"the best trial ({best['number']}) was built by {best['worker']}; its build directory "
                     f"{best['build_dir']} is on that machine")
    elif write_best:
        best_path = res.write_best(best, Path(scfg.out), data, plot)
    elif (Path(scfg.out) / Path(best["build_dir"]).name / res.SEARCH_JSON).is_file():
        best_path = Path(scfg.out) / Path(best["build_dir"]).name
    if write_best and not scfg.keep_trials:
        n, freed = res.drop_dominated_artifacts(rows, pareto, best)
        if n:
            say(f"removed the model files of {n} trial(s) off the Pareto front ({freed / 1e6:.1f} MB; their "
                "manifests and reports stay; --keep-trials keeps them)")
    done = sum(1 for r in rows if r["state"] == "COMPLETE")
    failed = [r for r in rows if r["state"] == "FAIL" and r["reason"]]
    say(f"{done} trials finished, {len(failed)} failed, Pareto front: {pareto or 'none feasible'}; "
        f"table {table}, plot {plot}")
    if best_path:
        say(f"best build (trial {best['number']}): {best_path}")
    return SearchResult(study_name, redact(url), rows, best, best_path, pareto, table, plot, md, sdir, note, notes)


def show(study: str, storage: str | None = None, out: str = "dist", progress: Say | None = None) -> SearchResult:
    """The stored study: its trials, Pareto front and best build (tables and plot redrawn; no
    build is copied)."""
    scfg = SearchConfig(study=study, storage=storage, out=out)
    sdir = search_dir(out, study).resolve()
    url = storage_url(scfg.model_copy(update={"out": str(Path(out).resolve())}), study)
    if is_sqlite(url) and storage is None and not (sdir / STUDY_DB).is_file():
        raise EdgepackError(f"no search {study!r} under {out} (no {sdir / STUDY_DB})",
                            "pass --out DIR as the search was run, or --storage URL for a shared study")
    storage_obj = open_storage(url, scfg.heartbeat_s, scfg.grace_s, scfg.max_retry)
    loaded = open_study(study, storage_obj, None, {}, create=False)
    meta = loaded.user_attrs.get("edgepack") or {}
    previous = sdir / res.SEARCH_JSON
    note = json.loads(previous.read_text()).get("latency_note", "") if previous.is_file() else ""
    sdir.mkdir(parents=True, exist_ok=True)
    scfg = scfg.model_copy(update={"trials": meta.get("trials", 1)})
    return finalize(study, url, meta.get("target", "?"), scfg, sdir, note, progress or (lambda m: None),
                    write_best=False)
