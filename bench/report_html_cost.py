"""What report.html adds to the build of the embedded example (the goal: at most 2 s).

Builds the embedded example (`edgepack build --target x86`, in-process) round after round, with
the HTML page and without it (its renderer replaced by an empty page for that variant), so the
drifting load of the shared machine hits both alike. The stage cache is on, as it is for a
user's second build, and also off (every stage recomputed), because the page's cost does not
depend on the cache while the rest of the build does. Also times `write_html` alone on a finished
build directory, which is the cost itself without the noise of the rest of the build.

    .venv/bin/python bench/report_html_cost.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import edgepack  # noqa: E402
from edgepack import report_html  # noqa: E402


def build_seconds(out: Path, cache: bool, html: bool) -> float:
    real = report_html.render_html
    if not html:
        report_html.render_html = lambda build_dir, m, peak_mb=None: "<!doctype html><title>off</title>"
    try:
        t0 = time.perf_counter()
        result = edgepack.build(target="x86", out=str(out), cache=cache, latency_runs=20)
        took = time.perf_counter() - t0
    finally:
        report_html.render_html = real
    page = (result.path / report_html.HTML).read_text()
    assert ("<title>off</title>" in page) != html, "the variant did not take effect"
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    doc = {"machine": common.machine(), "rounds": args.rounds, "builds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EDGEPACK_CACHE_DIR"] = str(Path(tmp) / "cache")  # a cold private cache, warmed by round 0
        times: dict[str, list[float]] = {}
        for r in range(args.rounds + 1):
            for cache in (True, False):
                for html in (True, False):
                    label = f"cache={'on' if cache else 'off'} html={'on' if html else 'off'}"
                    took = build_seconds(Path(tmp) / "dist", cache, html)
                    if r > 0:  # round 0 warms the cache and the imports
                        times.setdefault(label, []).append(took)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
        build_dir = Path(tmp) / "dist" / "digits-cnn-x86"
        alone = []
        for _ in range(10):
            t0 = time.perf_counter()
            report_html.write_html(build_dir)
            alone.append(time.perf_counter() - t0)
        page_bytes = (build_dir / report_html.HTML).stat().st_size
    for label, v in times.items():
        doc["builds"][label] = {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)}
    b = doc["builds"]
    doc["html_added_s"] = {
        "cache on": b["cache=on html=on"]["median_s"] - b["cache=on html=off"]["median_s"],
        "cache off": b["cache=off html=on"]["median_s"] - b["cache=off html=off"]["median_s"]}
    doc["write_html_alone_s"] = {"median": statistics.median(alone), "max": max(alone), "n": len(alone)}
    doc["page_bytes"] = page_bytes
    doc["goal_s"] = 2.0
    doc["met"] = max(doc["write_html_alone_s"]["max"], *doc["html_added_s"].values()) <= 2.0
    path = common.save("report_html_cost", doc)
    print(f"HTML added (median of {args.rounds}): {doc['html_added_s']}; write_html alone "
          f"median {doc['write_html_alone_s']['median']:.3f}s max {doc['write_html_alone_s']['max']:.3f}s; "
          f"page {page_bytes / 1e3:.0f} kB -> {path}")


if __name__ == "__main__":
    main()
