"""edgepack.search without builds: the space, the constraints, the trial count, reaping dead
workers, the plot and report.html's search section. (Builds and real databases: test_search_runs.py.)"""
from __future__ import annotations

import json
from pathlib import Path
import tomllib

import optuna
import pytest

from edgepack.config import BuildConfig
from edgepack.errors import EdgepackError
from edgepack.pipeline import resolve_profile
from edgepack.search import SearchConfig, space as sp
from edgepack.search.config import default_study, redact, storage_url
from edgepack.search.objective import _excess
from edgepack.search.study import is_surplus, open_storage, reap_dead_local, tally


def test_space_defaults_flatten_and_apply(tmp_path):
    cfg = BuildConfig(target="rpi", prune={"epochs": 1, "to_latency": True})
    profile = resolve_profile(cfg)
    space = sp.resolve_space({"prune": {"ratio": [0.0, 0.5], "importance": "l1"},
                              "quantization": {"calibration_method": ["MinMax"]},
                              "compress": {"lowrank": {"rank_ratio": {"low": 0.25, "high": 0.75}}}}, profile, cfg)
    assert space["prune.ratio"] == [0.0, 0.5] and space["prune.importance"] == "l1"  # a scalar fixes a default
    assert space["compress.lowrank.rank_ratio"] == {"low": 0.25, "high": 0.75}
    assert "threads" in space and space["threads"][-1] == profile.threads
    assert "quantization.per_channel" in space and "max_float_nodes" in space
    values = {**sp.first_values(space), "prune.ratio": 0.5, "quantization.per_channel": False, "threads": 1,
              "quantization.activation_type": "QUInt8", "runtime": "onnxruntime"}
    tcfg = sp.apply(cfg, profile, values, tmp_path / "t", trial_minutes=3, device="pi-1")
    written = tomllib.loads((tmp_path / "t" / "target.toml").read_text())
    assert written["name"] == "rpi" and written["threads"] == 1 and written["runtime"] == "onnxruntime"
    assert written["formats"] == ["onnx"]
    assert written["quantization"]["per_channel"] is False and written["quantization"]["scheme"] == "fixed"
    assert tcfg.prune["ratio"] == 0.5 and "to_latency" not in tcfg.prune  # the space's ratio is the goal
    assert tcfg.prune["max_minutes"] == 3 and tcfg.prune["importance"] == "l1" and tcfg.prune["epochs"] == 1
    assert tcfg.compress == {"lowrank": {"rank_ratio": 0.25}}
    assert tcfg.device == "pi-1" and tcfg.out == str(tmp_path / "t")
    assert resolve_profile(tcfg).quantization.per_channel is False
    # ratio 0: no pruning at all, and the other pruning defaults drop out of the space
    no_prune = sp.resolve_space({"prune": {"ratio": 0.0}}, profile, cfg)
    assert not [k for k in no_prune if k.startswith("prune.") and k != "prune.ratio"]
    assert sp.apply(cfg, profile, {"prune.ratio": 0.0}, tmp_path / "u", 3, None).prune is None


def test_space_errors_name_the_key(tmp_path):
    cfg = BuildConfig(target="x86")
    profile = resolve_profile(cfg)
    for table, words in (({"quantization": {"calibration_method": []}}, "empty list"),
                         ({"prune": {"ratio": {"low": 0.6, "high": 0.1}}}, "above high"),
                         ({"prune": {"ratio": {"low": 0.1, "top": 0.5}}}, "a range is")):
        with pytest.raises(EdgepackError, match=words):
            sp.resolve_space(table, profile, cfg)
    for values, words in (({"weights": "x.safetensors"}, "not something a trial can change"),
                          ({"quantization.colour": 1}, "no such field"),
                          ({"runtime": "tensorrt"}, "use onnxruntime"),
                          ({"max_float_nodes": -1}, "max_float_nodes")):
        with pytest.raises(EdgepackError, match=words):
            sp.apply(cfg, profile, values, tmp_path / "t", 3, None)


def test_config_names_and_urls(tmp_path):
    assert default_study(None, None, "rpi") == "digits-cnn-rpi"
    assert default_study(None, "nets/my_net.py:build", "x86") == "my-net-x86"
    assert default_study("mynet", "m.onnx", "targets/jetson.toml") == "mynet-jetson"
    assert storage_url(SearchConfig(out=str(tmp_path)), "s") == f"sqlite:///{tmp_path / 's.search' / 'study.db'}"
    assert redact("postgresql://u:secret@db:5432/e") == "postgresql://u:***@db:5432/e"
    with pytest.raises(ValueError, match="not a database URL"):
        SearchConfig(storage="redis://x")


def test_constraint_excess_is_relative_and_fails_closed():
    assert _excess("latency_p50_ms", 20.0, 25.0) == pytest.approx(0.25)
    assert _excess("size_mb", 10.0, 5.0) == pytest.approx(-0.5)
    assert _excess("min_sqnr_db", 20.0, 30.0) == pytest.approx(-0.5)
    assert _excess("max_accuracy_drop", 1.0, None) == 1.0


def _study(tmp_path, **kw):
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat_s=1, grace_s=60, max_retry=2)
    return optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize", "minimize"])


def _add(study, state, number_attrs=None):
    t = optuna.trial.create_trial(state=state, values=[1.0, 1.0, 1.0] if state.name == "COMPLETE" else None,
                                  user_attrs=number_attrs or {}, params={}, distributions={})
    study.add_trial(t)


def test_trial_count_and_surplus(tmp_path):
    S = optuna.trial.TrialState
    study = _study(tmp_path)
    _add(study, S.COMPLETE)                               # 0 done
    _add(study, S.FAIL, {"reason": "device x: gone"})     # 1 done: it ran and failed for its own reason
    _add(study, S.FAIL)                                   # 2 a dead worker's trial: retried, not counted
    _add(study, S.FAIL, {"reason": "surplus", "surplus": True})  # 3 gave way: not counted
    t = tally(study)
    assert (t.done, t.running, t.waiting) == (2, 0, 0)
    a, b = study.ask(), study.ask()                       # two workers ask at once for the last trial
    assert not is_surplus(study, a.number, trials=3)
    assert is_surplus(study, b.number, trials=3)          # the later number gives way
    assert not is_surplus(study, b.number, trials=4)


def test_reap_dead_local_worker_requeues_its_trial(tmp_path):
    study = _study(tmp_path)
    import socket
    dead = study.ask()
    dead.set_user_attr("worker", f"{socket.gethostname()}:999999999:1")
    live = study.ask()
    from edgepack.search.study import worker_id
    live.set_user_attr("worker", worker_id())
    remote = study.ask()
    remote.set_user_attr("worker", "another-machine:1:1")
    assert reap_dead_local(study) == [dead.number]
    trials = study.get_trials()
    assert trials[dead.number].state.name == "FAIL"
    retry = [t for t in trials if t.state.name == "WAITING"]
    assert len(retry) == 1 and retry[0].system_attrs["failed_trial"] == dead.number
    assert {trials[live.number].state.name, trials[remote.number].state.name} == {"RUNNING"}
    assert reap_dead_local(study) == []                  # once only


def test_tradeoff_plot_and_report_section(tmp_path):
    from edgepack import plots
    from edgepack.report_html import _search
    trials = [{"number": i, "state": "COMPLETE", "params": {"prune.ratio": r}, "metric": m, "metric_name": "top-1 %",
               "latency_ms": lat, "latency_where": "host", "size_mb": s, "feasible": f, "violations": {},
               "not_judged": [], "reason": None}
              for i, (r, m, lat, s, f) in enumerate([(0.0, 99.0, 2.0, 1.0, True), (0.3, 98.0, 1.0, 0.6, True),
                                                     (0.6, 90.0, 0.5, 0.3, False), (0.1, 97.0, 2.5, 0.9, True)])]
    trials.append({"number": 4, "state": "FAIL", "params": {}, "metric": None, "latency_ms": None, "size_mb": None,
                   "reason": "device gone"})
    fig = plots.tradeoff_figure(trials, [0, 1], 0, "t")
    assert fig is not None and fig.axes[0].get_xlabel().startswith("p50 latency")
    plots.save_png(fig, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.tradeoff_figure(trials[4:], [], None, "t") is None
    (tmp_path / "search.json").write_text(json.dumps({"study": "s", "storage": "sqlite:///x", "trials": trials,
                                                      "pareto": [0, 1], "best": 0, "latency_note": "on host"}))
    html = "".join(_search(tmp_path, plots))
    assert "<h2>Search</h2>" in html and "data:image/png;base64," in html and "Pareto front (2)" in html
    assert _search(tmp_path / "nowhere", plots) == []


def test_devices_are_checked_before_any_trial(tmp_path):
    from edgepack.search.run import resolve_devices
    (tmp_path / "pi.toml").write_text('name = "pi"\ntarget = "rpi"\ntransport = "local"\n')
    (tmp_path / "box.toml").write_text('name = "box"\ntarget = "x86"\ntransport = "local"\n')
    cfg = BuildConfig(target="x86", devices_dir=[str(tmp_path)])
    assert "box" in resolve_devices(["all"], cfg, "x86", "x86_64") and "pi" not in resolve_devices(["all"], cfg, "x86", "x86_64")
    with pytest.raises(EdgepackError, match="device pi is aarch64"):
        resolve_devices(["pi"], cfg, "x86", "x86_64")
    with pytest.raises(EdgepackError, match="no device of the mobile kind"):
        resolve_devices(["all"], cfg, "mobile", "aarch64")
    assert resolve_devices([], cfg.model_copy(update={"device": "box"}), "x86", "x86_64") == ["box"]
    assert resolve_devices([], cfg, "x86", "x86_64") == []


def test_an_onnx_model_has_no_pruning_dimensions():
    cfg = BuildConfig(target="rpi", model="model.onnx")
    space = sp.resolve_space({}, resolve_profile(cfg), cfg)
    assert not [k for k in space if k.startswith("prune.")] and "runtime" not in space


@pytest.mark.parametrize("kind", ["tpe", "nsga2", "random"])
def test_samplers_take_the_constraints(tmp_path, kind):
    from edgepack.search.study import DIRECTIONS, make_sampler
    study = optuna.create_study(directions=DIRECTIONS, sampler=make_sampler(kind, 0, 8))

    def objective(trial):
        r = trial.suggest_float("prune.ratio", 0.0, 0.6, step=0.1)
        trial.set_constraint("latency_p50_ms", (1.0 - r) - 0.7)  # feasible only when r >= 0.3
        return 99.0 - 10 * r * r, 1.0 - r, 1.0 - r / 2
    study.optimize(objective, n_trials=8)
    assert study.best_trials and all(t.params["prune.ratio"] >= 0.3 - 1e-9 for t in study.best_trials)


def test_a_trial_failed_under_its_worker_does_not_stop_it(tmp_path):
    """Another worker declared this worker's trial dead (a paused machine): Optuna refuses the
    late result; the worker says so and goes on with the re-queued retry."""
    from edgepack.search.study import work
    study = _study(tmp_path)
    said = []

    def objective(trial):
        if trial.number == 0:  # what fail_stale_trials in another worker does
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            study._storage.get_heartbeat_stale_trial_callback()(study, study._storage.get_trial(trial._trial_id))
        return 1.0, 1.0, 1.0
    work(study, 1, objective, poll_s=0.1, local_storage=True, say=said.append)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "COMPLETE"] and study.get_trials()[1].system_attrs["failed_trial"] == 0
    assert any("declared dead" in s for s in said)


def test_a_budget_the_device_judged_is_not_vetoed_by_the_host():
    """Host p50 0.43 ms misses a 0.35 ms budget the device met at 0.30 ms: the trial is feasible,
    judged on the device; a budget only the host judged (size) still counts."""
    from types import SimpleNamespace as NS

    from edgepack.manifest import Verdict
    from edgepack.search.objective import figures_of

    metrics = NS(model_dump=lambda: {"accuracy": 90.0}, latency_ms=NS(p50=0.43), size_mb=0.2)
    host = [Verdict(budget="latency_p50_ms", limit=0.35, value=0.43, ok=False),
            Verdict(budget="size_mb", limit=1.0, value=0.2, ok=True)]
    m = NS(primary="model.int8.onnx", artifact=lambda path: NS(metrics=metrics), verdicts=host)
    device = {"device": "pi", "latency_ms": {"p50": 0.30},
              "verdicts": [{"budget": "latency_p50_ms", "limit": 0.35, "value": 0.30, "ok": True}]}
    fig = figures_of(NS(manifest=m, device_results=[device], path=Path("x"), passed=True), None)
    assert fig["feasible"] and fig["latency_ms"] == 0.30 and fig["latency_where"] == "pi"
    assert fig["constraints"]["latency_p50_ms"] < 0 and fig["constraints"]["size_mb"] < 0
    host[1] = Verdict(budget="size_mb", limit=0.1, value=0.2, ok=False)
    fig = figures_of(NS(manifest=m, device_results=[device], path=Path("x"), passed=False), None)
    assert not fig["feasible"] and set(fig["violations"]) == {"size_mb"}


def test_stepped_float_values_read_as_written():
    """Optuna's low + k * step gives 0.30000000000000004; the build and the trial table get 0.3."""
    trial = optuna.trial.FixedTrial({"prune.ratio": 0.1 + 2 * 0.1})
    assert trial.suggest_float("prune.ratio", 0.0, 0.6, step=0.1) != 0.3  # the noise is real
    assert sp.suggest(optuna.trial.FixedTrial({"prune.ratio": 0.1 + 2 * 0.1}),
                   {"prune.ratio": {"low": 0.0, "high": 0.6, "step": 0.1}}) == {"prune.ratio": 0.3}


def test_model_files_of_dominated_and_failed_trials_are_removed(tmp_path):
    from edgepack.search.results import drop_dominated_artifacts
    rows = []
    for n, state in enumerate(["COMPLETE", "COMPLETE", "FAIL", "RUNNING", "COMPLETE"]):
        build = tmp_path / "trials" / f"{n:04d}" / "net-rpi"
        build.mkdir(parents=True)
        for name in ("model.onnx", "model.int8.tflite", "eval/bundle.npz", "manifest.json", "report.md"):
            (build / name).parent.mkdir(exist_ok=True)
            (build / name).write_bytes(b"x" * 100)
        rows.append({"number": n, "state": state, "build_dir": str(build)})
    trials, freed = drop_dominated_artifacts(rows, pareto=[0], best={"number": 4})
    assert (trials, freed) == (2, 600)  # trial 1 (dominated) and 2 (failed): three model files each
    for n in range(5):
        build = tmp_path / "trials" / f"{n:04d}" / "net-rpi"
        assert (build / "manifest.json").is_file() and (build / "report.md").is_file()
        assert (build / "model.onnx").exists() == (n not in (1, 2))
        assert (build / "eval/bundle.npz").exists() == (n not in (1, 2))


def test_compression_stage_keys_reach_the_stages_own_options(tmp_path):
    # The README's [search] example for low-rank and clustering: each trial's values must be
    # options the stages accept, not only keys the space can hold.
    from edgepack.stages import cluster, factorize
    table = tomllib.loads('[search.compress.lowrank]\nmacs_target = [0.5, 0.7]\n'
                          '[search.compress.lowrank.finetune]\nepochs = 1\n'
                          '[search.compress.cluster]\nclusters = [16, 32]\n')["search"]
    cfg = BuildConfig(target="x86")
    profile = resolve_profile(cfg)
    space = sp.resolve_space(table, profile, cfg)
    assert space["compress.lowrank.macs_target"] == [0.5, 0.7] and space["compress.cluster.clusters"] == [16, 32]
    assert sp.searched(space)["compress.lowrank.macs_target"] == [0.5, 0.7]
    assert "compress.lowrank.finetune.epochs" not in sp.searched(space)  # a single value fixes it
    values = {**sp.first_values(space), "compress.lowrank.macs_target": 0.7, "compress.cluster.clusters": 32}
    tcfg = sp.apply(cfg, profile, values, tmp_path / "t", trial_minutes=3, device=None)
    assert tcfg.compress == {"lowrank": {"macs_target": 0.7, "finetune": {"epochs": 1}}, "cluster": {"clusters": 32}}
    lowrank = factorize.make_config(tcfg.compress["lowrank"], profile.simd_width)
    assert lowrank.macs_target == 0.7 and lowrank.finetune.epochs == 1
    assert cluster.Config.model_validate(tcfg.compress["cluster"]).clusters == 32
    with pytest.raises(EdgepackError, match="macs_target"):  # a bad value is the stage's clear error
        factorize.make_config({"macs_target": 1.5}, profile.simd_width)


def test_trial_rows_give_stepped_values_as_the_build_got_them():
    from edgepack.search.results import trial_rows
    study = optuna.create_study()
    dist = optuna.distributions.FloatDistribution(0.0, 0.8, step=0.05)
    study.add_trial(optuna.trial.create_trial(params={"prune.ratio": 7 * 0.05}, distributions={"prune.ratio": dist},
                                              value=1.0))
    assert study.trials[0].params["prune.ratio"] != 0.35  # what Optuna keeps: 0.35000000000000003
    assert trial_rows(study)[0]["params"] == {"prune.ratio": 0.35}


def _candidate(tmp_path, number: int, metric: float, p50: float, limit: float = 1.0) -> dict:
    build = tmp_path / f"trial{number}"
    build.mkdir()
    (build / "manifest.json").write_text(json.dumps({
        "primary": "model.int8.onnx", "verdicts": [{"budget": "size_mb", "limit": 5.0, "value": 1.0, "ok": True}],
        "bench": [{"device": "pi-1", "threads": 1, "verdicts": [
            {"budget": "latency_p50_ms", "limit": limit, "value": p50, "ok": p50 <= limit}]}]}))
    return {"number": number, "feasible": True, "metric": metric, "latency_ms": p50, "size_mb": 1.0,
            "build_dir": str(build), "latency_where": "pi-1", "not_judged": [], "artifact": "model.int8.onnx"}


def test_the_best_is_the_first_whose_latency_holds_up_when_measured_again(tmp_path):
    from edgepack.search.confirm import confirm_best
    rows = [_candidate(tmp_path, 0, 80.0, 0.9), _candidate(tmp_path, 1, 90.0, 0.95),  # 1: lucky once
            _candidate(tmp_path, 2, 85.0, 0.5), _candidate(tmp_path, 3, 70.0, 0.4)]
    again = {1: [1.3, 0.9, 1.2], 2: [0.6, 0.7, 0.5], 0: [0.8, 0.8, 0.8]}
    calls = []

    def measure(row):
        calls.append(row["number"])
        value = again[row["number"]][sum(c == row["number"] for c in calls) - 1]
        return {"p50": value, "p90": value * 1.1}

    best, record = confirm_best(rows, measure, rounds=3, candidates=3, say=lambda m: None)
    assert best["number"] == 2  # trial 1, the most accurate, measured 1.2 ms in the median
    assert calls == [1, 2, 0] * 3  # interleaved, most preferred first; trial 3 is not a candidate
    assert record == {"rounds": 3, "candidates": [1, 2, 0], "best": 2}
    assert rows[1]["confirm"]["confirmed"] is False and rows[1]["confirm"]["missed"]["latency_p50_ms"] == \
        {"limit": 1.0, "median": 1.2}
    assert rows[2]["confirm"]["confirmed"] and rows[2]["confirm"]["median_p50_ms"] == 0.6
    assert "confirm" not in rows[3]


def test_no_confirmed_candidate_means_no_best_and_a_dead_device_confirms_nothing(tmp_path):
    from edgepack.devices.errors import DeviceError
    from edgepack.search.confirm import confirm_best
    rows = [_candidate(tmp_path, 0, 80.0, 0.9)]

    def dead(row):
        raise DeviceError("device pi-1: cannot connect")

    best, record = confirm_best(rows, dead, rounds=2, candidates=3, say=lambda m: None)
    assert best is None and record["best"] is None
    assert rows[0]["confirm"]["errors"] == ["DeviceError: device pi-1: cannot connect"] * 2
    assert rows[0]["confirm"]["missed"] == {"latency_p50_ms": {"limit": 1.0, "median": None}}


def test_nothing_to_confirm_without_a_latency_budget_or_with_confirmation_off(tmp_path):
    from edgepack.search.confirm import confirm_best
    rows = [_candidate(tmp_path, 0, 80.0, 0.9), _candidate(tmp_path, 1, 90.0, 2.0, limit=5.0)]
    never = lambda row: pytest.fail("measured")  # noqa: E731
    assert confirm_best(rows, never, rounds=0, candidates=3, say=print) == (rows[1], None)
    rows[1]["not_judged"] = ["latency_p50_ms"]  # an emulated device's latency: not a budget to confirm
    assert confirm_best(rows, never, rounds=3, candidates=3, say=print) == (rows[1], None)


def test_a_missed_median_prints_with_the_digits_that_tell_it_from_its_limit():
    from edgepack.search.confirm import _ms
    assert _ms(0.5543, 0.554) == "0.5543 ms"
    assert _ms(0.55400002, 0.554).startswith("0.55400002")
    assert _ms(0.61, 0.554) == "0.610 ms"
    assert _ms(0.61) == "0.610 ms" and _ms(None, 0.5) == "-"
