"""report.md: what was built, how it measured, and whether it fits the target."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest import Manifest, write_text_atomic

REPORT = "report.md"


def fmt(v, digits=2, suffix=""):
    if v is None:
        return "-"
    return f"{v:.{digits}f}{suffix}" if isinstance(v, float) else f"{v}{suffix}"


def artifact_rows(m: Manifest, peak_mb: dict | None = None) -> list[list[str]]:
    rows = []
    for a in m.artifacts:
        lat, q = a.metrics.latency_ms, a.metrics
        rows.append([a.path, a.format, a.precision, fmt(a.size_bytes / 1e6, 3),
                     fmt(a.compressed_bytes / 1e6, 3) if a.compressed_bytes else "-", fmt(q.accuracy),
                     fmt(q.agreement), fmt(q.metric, 4), fmt(q.sqnr_db, 1),
                     fmt(lat.p50 if lat else None, 3), fmt(lat.p90 if lat else None, 3),
                     fmt((peak_mb or {}).get(a.path), 1)])
    return rows


ARTIFACT_HEADER = ["artifact", "format", "precision", "size MB", "zip MB", "top-1 %", "agreement %", "metric",
                   "SQNR dB", "p50 ms", "p90 ms", "peak MB"]


def io_section(m: Manifest) -> list[str]:
    """What the model takes and gives, and the exact shapes latency and memory were measured at."""
    first = m.artifacts[0] if m.artifacts else None
    declared = {s.name: s.shape for s in (first.inputs if first else [])}
    rows = [[s.name, s.dtype, "x".join(map(str, s.shape)), "x".join(map(str, declared.get(s.name, s.shape)))]
            for s in m.inputs]
    lines = ["## Inputs and outputs", "", "Latency and memory were measured at exactly the shapes below "
             "(batch first); the artifacts keep the dimensions the file declares.", "",
             table(["input", "dtype", "measured at", "artifact declares"], rows), ""]
    fid = [(a, n, o) for a in m.artifacts if a.metrics.outputs for n, o in a.metrics.outputs.items()]
    if fid:
        lines += ["Per-output fidelity against the float model (SQNR dB / cosine / max abs diff):", "",
                  table(["artifact", "output", "SQNR dB", "cosine", "max abs diff"],
                        [[a.path, n, fmt(o["sqnr_db"], 1), f"{o['cosine']:.5f}", f"{o['max_abs_diff']:.3g}"]
                         for a, n, o in fid]), ""]
    return lines


def verdict_rows(verdicts) -> list[list[str]]:
    mark = {True: "pass", False: "FAIL", None: "not judged"}
    return [[v.budget, fmt(v.limit), fmt(v.value, 3), mark[v.ok], v.note or ""] for v in verdicts]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render(m: Manifest, sections: dict[str, Any]) -> str:
    t = m.target
    data = m.stages.get("data", {})
    parts = [f"# {m.name} for {t['name']}: {'PASS' if m.passed else 'FAIL'}", "",
             f"Target `{t['name']}` ({t.get('description', '')}): {t['arch']}, {t['runtime']}, "
             f"{t['threads']} thread(s). Built {m.created} with edgepack {m.edgepack_version} on "
             f"{m.versions.get('machine', '?')}. Judged artifact: `{m.primary}`.", "",
             "## Artifacts", "", table(ARTIFACT_HEADER, artifact_rows(m, sections.get("peak_mb"))), ""]
    if data:
        what = "labelled" if data.get("labelled") else "unlabelled: quality is agreement/fidelity with the float model"
        classes = data.get("classes_in_calibration")
        parts += [f"Evaluation: {data['evaluation_samples']} samples from {data['evaluation']} ({what})"
                  + (" - no --eval given, so this is the calibration data." if data.get("eval_is_calibration") else ".")
                  + f" {data.get('split', '')}."
                  + f" Calibration: seeded, stratified sample from {data['calibration_samples']} samples of "
                  f"{data['calibration']}" + (f" ({classes} classes drawn)." if classes else "."), ""]
    judged = m.stages.get("judge", {})
    if judged.get("why"):
        parts += [f"Judged artifact `{m.primary}`: {judged['why']}.", ""]
    parts += io_section(m)
    parts += ["## Budgets", "", table(["budget", "limit", "value", "verdict", "note"], verdict_rows(m.verdicts)), ""]
    exp = m.stages.get("export", {})
    prep = exp.get("prepared")
    if prep:
        parts += ["## Input model preparation", "", f"{prep.get('producer') or 'unknown producer'}, opset "
                  f"{prep.get('original_opset')} -> {prep.get('opset')}; fp16 -> fp32: {prep.get('fp16_to_fp32')}; "
                  f"external data: {prep.get('external_data')}; check: {prep.get('check')}.", ""]
    if "parity" in exp:
        p = exp["parity"]
        parts += ["## Export", "", f"ONNX opset 17, simplified to {exp['nodes']} nodes in {exp['seconds']} s. "
                  f"Parity with PyTorch on {p['samples']} samples: max abs diff {p['max_abs_diff']:.3g}, "
                  f"cosine {p['cosine']:.6f}, top-1 agreement {fmt(p['top1_agreement'])}%.", ""]
    q = m.stages.get("quantize")
    if q:
        parts += ["## Quantization", "", f"Static int8, QDQ, {q['activation_type']} activations, "
                  f"{q['weight_type']} weights, {'per-channel' if q['per_channel'] else 'per-tensor'}, "
                  f"{q['method']} calibration on {q['calibration_samples']} samples ({q['seconds']} s)."
                  + (" Reused from the stage cache." if q.get("cache", {}).get("reused") else ""), ""]
        if q.get("sensitivity"):
            parts += ["Nodes that lose the most SQNR in int8 (32 calibration samples; a node's own loss is its "
                      "input's SQNR minus its output's):", "",
                      table(["node", "op", "SQNR dB", "lost dB"],
                            [[r["node"], r["op"], r["sqnr_db"], r["lost_db"]] for r in q["sensitivity"][:10]]), ""]
        if q.get("float_nodes"):
            parts += ["Nodes that still compute in float in the int8 model (ONNX Runtime's view):", "",
                      table(["node", "op", "why"], [[r["node"], r["op"], r.get("reason", "")] for r in q["float_nodes"][:20]]), ""]
    fb = m.stages.get("fallback")
    if fb:
        status = "met" if fb["met_budget"] else "still NOT met"
        parts += ["### Accuracy-aware fallback", "",
                  f"Applies to {fb.get('applies_to', 'the ONNX int8 artifact')}. "
                  f"Chosen on {fb.get('chosen_on', 'the evaluation samples')}: int8 drop {fb['initial_drop']} "
                  f"(SQNR {fb.get('initial_sqnr_db')} dB) missed a quality budget; after leaving "
                  f"{len(fb['float_nodes'])} node(s) in float the drop is {fb['final_drop']} "
                  f"(SQNR {fb.get('final_sqnr_db')} dB; budget {status}).",
                  "", "Nodes left in float: " + (", ".join(f"`{n}`" for n in fb["float_nodes"]) or "none"), "",
                  "Most sensitive nodes (SQNR lost in the node, dB):", "",
                  table(["node", "op", "SQNR dB", "lost dB"],
                        [[r["node"], r["op"], r["sqnr_db"], r["lost_db"]] for r in fb["ranking"][:10]]), ""]
    for key in ("prune", "factorize", "cluster", "sparsify", "tflite", "qat", "fp16", "bench"):  # in pipeline order
        if sections.get(key):
            parts += [sections[key].rstrip(), ""]
    parts += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in m.versions.items()), "",
              f"Config hash `{m.config_hash}`, data hash `{m.data_hash}`.", ""]
    return "\n".join(parts)


def write_report(build_dir: Path, m: Manifest, sections: dict[str, Any]) -> Path:
    path = Path(build_dir) / REPORT
    write_text_atomic(path, render(m, sections))
    return path


def append_section(build_dir: Path, text: str) -> None:
    """Add a section at the end of report.md (call it holding `manifest.build_lock`)."""
    path = Path(build_dir) / REPORT
    old = path.read_text() if path.exists() else ""
    write_text_atomic(path, old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")
