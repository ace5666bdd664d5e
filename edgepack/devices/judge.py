"""Judge an on-device benchmark against the target's budgets.

Latency is judged only on real hardware: an emulated device (qemu) measures it but its
figures say nothing about the real chip, so those verdicts are `ok=None` with a note. Quality
(the accuracy drop on the device's own kernels) is judged on every device, emulated or not.
"""
from __future__ import annotations

from typing import Any

from ..manifest import Verdict
from ..quality import figure
from .deploy import normalize_arch  # arm64 and aarch64 are one architecture


def budgets_for(manifest_target: dict[str, Any], device_profile) -> tuple[dict[str, Any], str]:
    """The build's own target budgets (what the build promised) when the manifest has them,
    else the device profile's."""
    if isinstance(manifest_target, dict) and isinstance(manifest_target.get("budgets"), dict):
        return manifest_target["budgets"], f"target {manifest_target.get('name', '?')!r} of the build"
    return device_profile.budgets.model_dump(), f"target {device_profile.name!r} of the device"


def judge(result: dict, budgets: dict[str, Any], device_name: str, emulated: bool,
          target_arch: str | None = None) -> list[Verdict]:
    """Verdicts for latency p50/p90 and peak memory. Latency is not judged on an emulated device,
    nor when the device's arch differs from the build target's (`target_arch`)."""
    lat = result["latency_ms"]
    where = f"on {device_name}"
    machine = result.get("env", {}).get("machine")
    off_target = bool(target_arch and machine and normalize_arch(machine) != normalize_arch(target_arch))
    checks = [
        ("latency_p50_ms", lat["p50"], True),
        ("latency_p90_ms", lat["p90"], True),
        ("peak_memory_mb", result["memory_mb"]["peak_rss"], False),
    ]
    verdicts = []
    for budget, value, is_latency in checks:
        limit = budgets.get(budget)
        if limit is None:
            continue
        value = None if value is None else round(float(value), 3)
        if is_latency and emulated:
            ok, note = None, f"{where} (emulated): latency measured, not judged"
        elif is_latency and off_target:
            ok, note = None, f"{where}: measured on {machine}, the build targets {target_arch}; not judged"
        elif value is None:
            ok, note = None, f"{where}: not measurable on this device"
        else:
            ok, note = value <= float(limit), where
            if emulated:
                note += " (emulated: includes the emulator's own memory)"
        verdicts.append(Verdict(budget=budget, limit=float(limit), value=value, ok=ok,
                                artifact=result["artifact"], note=note))
    return verdicts


def judge_quality(record: dict | None, budgets: dict[str, Any], device_name: str, emulated: bool) -> list[Verdict]:
    """`max_accuracy_drop` and `min_sqnr_db` judged on the device's own outputs of the timed
    artifact: its figure on the evaluation subset vs this machine's fp32 figure on the same
    samples. Judged on an emulator too: its kernels (aarch64 under qemu) are real, only its
    clock is not."""
    if record is None:
        return []
    where = f"on {device_name}" + (" (emulated: real aarch64 kernels)" if emulated else "")
    basis = (f"{where}: {record['samples']} samples, {record['artifact']} on the device vs "
             f"{record['reference'] or 'no fp32 artifact'} on this machine")
    verdicts = []
    limit = budgets.get("max_accuracy_drop")
    if limit is not None:
        value = record["drop"]
        verdicts.append(Verdict(budget="max_accuracy_drop", limit=float(limit), value=value,
                                ok=None if value is None else value <= float(limit), artifact=record["artifact"],
                                note=f"{basis}; drop in {record['drop_unit']}"))
    limit = budgets.get("min_accuracy")
    if limit is not None:
        value, unit = figure(record["device"])
        verdicts.append(Verdict(budget="min_accuracy", limit=float(limit), value=value,
                                ok=None if value is None else value >= float(limit), artifact=record["artifact"],
                                note=f"{basis}; {unit} on the device"))
    limit = budgets.get("min_sqnr_db")
    sqnr = record["device"].get("sqnr_db")
    if limit is not None:
        verdicts.append(Verdict(budget="min_sqnr_db", limit=float(limit), value=sqnr,
                                ok=None if sqnr is None else sqnr >= float(limit), artifact=record["artifact"],
                                note=f"{basis}; lowest SQNR of any output"))
    return verdicts
