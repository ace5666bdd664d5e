"""The summaries, the issue's goals and the plot of bench/compress_tradeoff.py (from its cached rows)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import compress_tradeoff_lib as L


# --- summary ----------------------------------------------------------------------------------

QAT_SAME_LAYERS = {"qat": "baseline", "prune_qat": "prune_l2"}  # train_qat folds BatchNorm, as the export does


def drop_stats(rows: list[dict], ref: np.ndarray, what: str) -> dict:
    """Mean drop over seeds; SE from the test sample (paired, per-sample differences averaged over
    seeds) and between seeds, combined; within noise when |drop| < 2 SE."""
    cs = [L.unpack(r["correct"][what]) for r in rows]
    d = np.mean([ref.astype(float) - c.astype(float) for c in cs], axis=0)
    per_seed = [100 * float((ref.astype(float) - c.astype(float)).mean()) for c in cs]
    se_test = 100 * float(d.std(ddof=1) / math.sqrt(len(d)))
    se_seeds = float(np.std(per_seed, ddof=1) / math.sqrt(len(per_seed))) if len(per_seed) > 1 else 0.0
    se = math.sqrt(se_test ** 2 + se_seeds ** 2)
    mean = float(np.mean(per_seed))
    return {"drop": round(mean, 3), "se": round(se, 3), "se_test": round(se_test, 3), "se_seeds": round(se_seeds, 3),
            "per_seed": [round(x, 3) for x in per_seed], "within_noise": abs(mean) < 2 * se}


def summarize(state: dict) -> dict:
    base, lat = state["baseline"], (state.get("latency") or {}).get("p50_ms", {})
    ref = {k: L.unpack(v) for k, v in base["correct"].items()}
    out = {}
    methods = dict.fromkeys(r["method"] for r in state["rows"].values())
    for m in ["fp16"] + list(methods):
        if m == "fp16":
            rows, s0 = [], {"macs": base["macs"], "params": base["params"], "sizes": base["sizes"]}
        else:
            rows = [r for r in state["rows"].values() if r["method"] == m and "error" not in r]
            errors = [r["error"] for r in state["rows"].values() if r["method"] == m and "error" in r]
            if not rows:
                out[m] = {"error": errors}
                continue
            s0 = next((r for r in rows if r["seed"] == 0), rows[0])
        e = {"seeds": len(rows), "macs": s0["macs"], "params": s0["params"],
             "macs_reduction": round(base["macs"] / s0["macs"], 3), "params_reduction": round(base["params"] / s0["params"], 3)}
        sz = {"baseline": base["sizes"]} if m == "fp16" else s0["sizes"]
        e["size_bytes"] = {k: v["raw_bytes"] for k, v in (base["sizes"] if m == "fp16" else sz).items()}
        e["deflate_bytes"] = {k: v["deflate_bytes"] for k, v in (base["sizes"] if m == "fp16" else sz).items()}
        if m == "fp16":
            e["top1"] = {k: base["top1"][k] for k in ("fp16.onnx", "fp16.tflite") if k in ref}
            e["drop_vs_fp32"] = {k: L.paired_drop(ref["fp32"], ref[k]) for k in ("fp16.onnx", "fp16.tflite") if k in ref}
            pairs = {"ort_fp16_vs_fp32": ("fp32.onnx", "fp16.onnx"), "litert_fp16_vs_fp32": ("fp32.tflite", "fp16.tflite")}
            e["speedup"] = {k: L.speedup(lat[f"baseline|{a}"], lat[f"baseline|{b}"]) for k, (a, b) in pairs.items()
                            if f"baseline|{b}" in lat and f"baseline|{a}" in lat}
            e["latency_p50_ms"] = {k: lat[f"baseline|{k}"]["p50_ms"] for k in ("fp16.onnx", "fp16.tflite") if f"baseline|{k}" in lat}
            out[m] = e
            continue
        e["int8_deflate_vs_plain_int8"] = round(base["sizes"]["int8.onnx"]["deflate_bytes"]
                                                / s0["sizes"]["int8.onnx"]["deflate_bytes"], 3)
        e["top1"] = {k: L.mean_se([r["top1"][k]["top1"] if r["top1"].get(k) else None for r in rows])
                     for k in ("before_ft", "fp32", "int8.onnx", "int8.tflite")}
        e["drop_fp32_vs_baseline_fp32"] = drop_stats(rows, ref["fp32"], "fp32")
        e["drop_int8_vs_plain_int8"] = drop_stats(rows, ref["int8.onnx"], "int8.onnx") if not L.planted(m) else None
        if "int8.tflite" in s0["correct"]:
            e["drop_litert_int8_vs_plain_litert_int8_seed0"] = L.paired_drop(ref["int8.tflite"], L.unpack(s0["correct"]["int8.tflite"]))
        if L.planted(m):
            e["ptq_drop"] = L.mean_se([r["ptq_drop"]["drop"] for r in rows])
            e["qat_drop"] = L.mean_se([r["qat_drop"]["drop"] for r in rows])
            e["fraction_recovered"] = L.mean_se([r["fraction_recovered"] for r in rows])
        if f"{m}|int8.onnx" in lat:
            e["latency_p50_ms"] = {k: lat[f"{m}|{k}"]["p50_ms"] for k in ("fp32.onnx", "int8.onnx", "int8.tflite") if f"{m}|{k}" in lat}
            e["speedup"] = {"ort_fp32_vs_baseline_fp32": L.speedup(lat["baseline|fp32.onnx"], lat[f"{m}|fp32.onnx"]),
                            "ort_int8_vs_plain_int8": L.speedup(lat["baseline|int8.onnx"], lat[f"{m}|int8.onnx"]),
                            "ort_int8_vs_baseline_fp32": L.speedup(lat["baseline|fp32.onnx"], lat[f"{m}|int8.onnx"])}
            owner = m if f"{m}|int8.tflite" in lat else s0.get("litert_as")
            if f"{owner}|int8.tflite" not in lat and m in QAT_SAME_LAYERS:  # BatchNorm folded: the same layers
                owner = QAT_SAME_LAYERS[m]
            if owner and f"{owner}|int8.tflite" in lat:
                e["latency_p50_ms"]["int8.tflite"] = lat[f"{owner}|int8.tflite"]["p50_ms"]
                e["speedup"]["litert_int8_vs_plain_litert_int8"] = L.speedup(lat["baseline|int8.tflite"],
                                                                             lat[f"{owner}|int8.tflite"])
                e["litert_timed_as"] = owner
        e["facts_seed0"] = s0["facts"]
        out[m] = e
    out["baseline"] = {"macs": base["macs"], "params": base["params"], "top1": base["top1"],
                       "size_bytes": {k: v["raw_bytes"] for k, v in base["sizes"].items()},
                       "deflate_bytes": {k: v["deflate_bytes"] for k, v in base["sizes"].items()},
                       "latency_p50_ms": {k.split("|")[1]: v["p50_ms"] for k, v in lat.items() if k.startswith("baseline|")}}
    return out


# --- the goals and the plot --------------------------------------------------------------

def _get(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def goals(summaries: dict[str, dict]) -> dict:
    """Each goal per model measured; `met` only when met on every model that measured it."""
    out = {}

    def add(goal: str, text: str, per_model: dict):
        per_model = {k: v for k, v in per_model.items() if v is not None}
        out[goal] = {"goal": text, **per_model,
                     "met": bool(per_model) and all(v["met"] for v in per_model.values()),
                     "models_measured": list(per_model)}

    def lowrank(s, method="lowrank"):
        e = s.get(method) or {}
        red, drop, sp = e.get("macs_reduction"), _get(e, "drop_fp32_vs_baseline_fp32"), _get(e, "speedup", "ort_fp32_vs_baseline_fp32")
        timed_as = method
        if sp is None and method != "lowrank":  # the same layer shapes as lowrank's: its latency
            sp, timed_as = _get(s, "lowrank", "speedup", "ort_fp32_vs_baseline_fp32"), "lowrank"
        if red is None or drop is None:
            return None
        return {"macs_reduction": red, "top1_drop_fp32": drop, "ort_fp32_speedup": sp, "speedup_timed_as": timed_as,
                "seeds": e["seeds"], "met": red >= 1.95 and drop["drop"] <= 1.0 and sp is not None and sp >= 1.5}

    def clus(s):
        e = s.get("cluster") or {}
        ratio, drop = e.get("int8_deflate_vs_plain_int8"), e.get("drop_int8_vs_plain_int8")
        if ratio is None or drop is None:
            return None
        return {"int8_deflate_bytes": _get(e, "deflate_bytes", "int8.onnx"), "plain_int8_deflate_bytes": None,
                "compressed_ratio_vs_plain_int8": ratio, "top1_drop_int8_vs_plain_int8": drop, "seeds": e["seeds"],
                "met": ratio >= 2.0 and drop["drop"] <= 1.0}

    def qat(s):
        e = s.get("qat_outliers") or {}
        if not e.get("seeds"):
            return None
        ptq, fr = e["ptq_drop"]["mean"], e["fraction_recovered"]["mean"]
        return {"config": "planted outlier channels, per-tensor int8 weights (compress_qat.py's)", "ptq_drop": e["ptq_drop"],
                "qat_drop": e["qat_drop"], "fraction_recovered": e["fraction_recovered"], "seeds": e["seeds"],
                "ptq_loses_2_points": ptq >= 2.0, "met": ptq >= 2.0 and fr is not None and fr >= 0.5,
                "fixed_ranges_control": {k: (s.get("qat_outliers_fixed") or {}).get(k)
                                         for k in ("qat_drop", "fraction_recovered", "seeds")},
                "x86_scheme_row": {"ptq_drop_int8": _get(s, "baseline", "top1"),
                                   "qat_int8_top1": _get(s, "qat", "top1", "int8.onnx")}}

    def versus(s, a, others, text):
        ea = s.get(a) or {}
        if not ea.get("seeds") or any(not (s.get(o) or {}).get("seeds") for o in others):
            return None
        ta = ea["top1"]["fp32"]["mean"]
        r = {"top1_fp32": {a: ea["top1"]["fp32"], **{o: s[o]["top1"]["fp32"] for o in others}},
             "macs": {a: ea["macs"], **{o: s[o]["macs"] for o in others}}, "comparison": text}
        for o in others:
            diff = round(ta - s[o]["top1"]["fp32"]["mean"], 3)
            se = round(math.hypot(ea["drop_fp32_vs_baseline_fp32"]["se"], s[o]["drop_fp32_vs_baseline_fp32"]["se"]), 3)
            r[f"{a}_minus_{o}"] = {"points": diff, "se": se, "within_noise": abs(diff) < 2 * se}
        r["met"] = all(r[f"{a}_minus_{o}"]["points"] >= 0 for o in others)
        return r

    add("lowrank", "low-rank: 2x fewer MACs, top-1 drop <= 1.0 point, ORT fp32 speed-up >= 1.5x",
        {k: lowrank(s) for k, s in summaries.items()})
    add("lowrank_stage_epochs", "the same goal with the factorize stage's default fine-tuning (5 epochs, not 1)",
        {k: lowrank(s, "lowrank_ft5") for k, s in summaries.items()})
    add("clustering", "16 clusters + int8: compressed >= 2x smaller than plain int8 compressed, drop <= 1.0 vs plain int8",
        {k: clus(s) for k, s in summaries.items()})
    add("qat", "on a config where PTQ loses >= 2 points, QAT recovers >= half of it", {k: qat(s) for k, s in summaries.items()})
    add("slimming_vs_l2", "network slimming at least as accurate as l2 at the same MACs",
        {k: versus(s, "prune_slimming", ["prune_l2"], "fp32 top-1 after fine-tuning") for k, s in summaries.items()})
    add("entropy_vs_l2_taylor", "entropy importance at least as accurate as l2 and taylor at 2x fewer MACs",
        {k: versus(s, "prune_entropy", ["prune_l2", "prune_taylor"], "fp32 top-1 after fine-tuning")
         for k, s in summaries.items()})
    for k, s in summaries.items():
        if out["clustering"].get(k):
            out["clustering"][k]["plain_int8_deflate_bytes"] = _get(s, "baseline", "deflate_bytes", "int8.onnx")
        if out["qat"].get(k):
            b = s["baseline"]["top1"]
            out["qat"][k]["x86_scheme_row"] = {"ptq_drop_points": round(b["fp32"]["top1"] - b["int8.onnx"]["top1"], 3),
                                               "qat_int8_top1": _get(s, "qat", "top1", "int8.onnx")}
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = [m for m in doc["models"] if doc["models"][m]["summary"]]
    if not models:
        return
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.6 * len(models)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for row, name in zip(axes, models):
        s = doc["models"][name]["summary"]
        b = s["baseline"]
        for ax, xlabel in zip(row, ("int8 ONNX deflate-9 size (kB, log)", "ORT latency p50, 1 thread, batch 1 (ms)")):
            lat = b.get("latency_p50_ms", {})
            pts = [("baseline fp32", b["deflate_bytes"]["fp32.onnx"], lat.get("fp32.onnx"), b["top1"]["fp32"]["top1"], 0, "o"),
                   ("plain int8", b["deflate_bytes"]["int8.onnx"], lat.get("int8.onnx"), b["top1"]["int8.onnx"]["top1"], 0, "s"),
                   ("fp16", b["deflate_bytes"]["fp16.onnx"], lat.get("fp16.onnx"), b["top1"]["fp16.onnx"]["top1"], 0, "D")]
            for i, (m, e) in enumerate((m, e) for m, e in s.items() if m not in ("baseline", "fp16") and not L.planted(m)):
                if "top1" not in e:
                    continue
                drop = e.get("drop_int8_vs_plain_int8") or {}
                pts.append((m, e["deflate_bytes"]["int8.onnx"], (e.get("latency_p50_ms") or {}).get("int8.onnx"),
                            e["top1"]["int8.onnx"]["mean"], drop.get("se", 0),
                            "^" if m in ("prune_lowrank", "prune_cluster", "prune_qat") else "v"))
            for i, (label, size, ms, top1, err, marker) in enumerate(pts):
                x = size / 1e3 if "size" in xlabel else ms
                if x is None or top1 is None:
                    continue
                color = "black" if i < 2 else cmap(i % 20)
                ax.errorbar(x, top1, yerr=err, fmt=marker, color=color, ms=7, capsize=3, label=label)
                ax.annotate(label, (x, top1), fontsize=6, textcoords="offset points", xytext=(4, 3))
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test top-1 (%), int8 ONNX (fp32 / fp16: their ONNX)")
            ax.set_title(f"{name}: mean over seeds, error bar = SE of the drop vs plain int8", fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(doc: dict) -> str:
    """Markdown tables of the measured figures, one per model (the README paragraph's)."""
    out = []

    def f(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}"

    for name, m in doc["models"].items():
        s, b = m["summary"], m["summary"]["baseline"]
        lat = b.get("latency_p50_ms", {})
        out += [f"**{name}** (width {m['setup']['width']}; baseline {b['macs'] / 1e6:.1f} M MACs, {b['params'] / 1e3:.0f} k "
                f"params, fp32 top-1 {b['top1']['fp32']['top1']:.2f} (SE {b['top1']['fp32']['se']:.2f}, n "
                f"{b['top1']['fp32']['n']}), plain int8 ONNX {b['top1']['int8.onnx']['top1']:.2f}, int8 ONNX "
                f"{b['size_bytes']['int8.onnx'] / 1e3:.0f} kB raw / {b['deflate_bytes']['int8.onnx'] / 1e3:.0f} kB deflated; "
                f"ORT fp32 {f(lat.get('fp32.onnx'), 3)} ms, ORT int8 {f(lat.get('int8.onnx'), 3)} ms, LiteRT int8 "
                f"{f(lat.get('int8.tflite'), 3)} ms)", "",
                "| method | seeds | MACs | params | int8 ONNX kB raw / deflated | top-1 before FT | fp32 top-1 after FT "
                "| int8 ONNX top-1 | int8 drop vs plain int8 (SE) | ORT fp32 speed-up | ORT int8 vs plain int8 "
                "| LiteRT int8 vs plain |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, e in s.items():
            if k == "baseline":
                continue
            if "top1" not in e:
                out.append(f"| {k} | failed: {'; '.join(e.get('error', []))[:120]} |||||||||||")
                continue
            sp = e.get("speedup", {})
            if k == "fp16":
                t = e["top1"]
                out.append(f"| fp16 (ONNX / TFLite) | - | 1.00x | 1.00x | {e['size_bytes']['fp16.onnx'] / 1e3:.0f} / "
                           f"{e['deflate_bytes']['fp16.onnx'] / 1e3:.0f} (fp16 ONNX) | - | - | "
                           f"{t['fp16.onnx']['top1']:.2f} (fp16 ONNX) | - | ORT fp16 vs fp32 {f(sp.get('ort_fp16_vs_fp32'))}x "
                           f"| - | LiteRT fp16 vs fp32 {f(sp.get('litert_fp16_vs_fp32'))}x |")
                continue
            d = e.get("drop_int8_vs_plain_int8") or e["drop_fp32_vs_baseline_fp32"]
            t = e["top1"]
            noise = " (noise)" if d["within_noise"] else ""
            out.append(f"| {k} | {e['seeds']} | {e['macs_reduction']:.2f}x fewer | {e['params_reduction']:.2f}x fewer | "
                       f"{e['size_bytes']['int8.onnx'] / 1e3:.0f} / {e['deflate_bytes']['int8.onnx'] / 1e3:.0f} | "
                       f"{f(t['before_ft']['mean'])} | {f(t['fp32']['mean'])} | {f(t['int8.onnx']['mean'])} | "
                       f"{d['drop']:+.2f} ({d['se']:.2f}){noise} | {f(sp.get('ort_fp32_vs_baseline_fp32'))}x | "
                       f"{f(sp.get('ort_int8_vs_plain_int8'))}x | {f(sp.get('litert_int8_vs_plain_litert_int8'))}x"
                       + (f" (as {e['litert_timed_as']})" if e.get("litert_timed_as") not in (None, k) else "") + " |")
        out.append("")
    return "\n".join(out)
