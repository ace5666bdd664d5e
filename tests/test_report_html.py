"""report.html: one self-contained page (figures inline, no request leaves the file), regenerated
by `edgepack report`; the acceptance test opens a real build's page in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from edgepack.manifest import (Artifact, ArtifactMetrics, LatencyMs, Manifest, TensorSpec, Verdict, read_manifest,
                               write_json_atomic)
from edgepack.report_html import HTML, render_html, sensitivity_lists, write_html, write_reports

ARTIFACTS = Path(os.environ.get("EDGEPACK_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
IMG = re.compile(r'<img src="([^"]*)" alt="([^"]*)"')


def _result(device: str, artifact: str, samples: list[float], profile: list | None = None, emulated=False) -> dict:
    """A device result as bench writes it to bench/<device>-<stamp>.json (the fields the report reads)."""
    s = sorted(samples)
    lat = {"min": s[0], "p50": s[len(s) // 2], "p90": s[int(len(s) * 0.9)], "p99": s[-1], "max": s[-1],
           "mean": sum(s) / len(s), "std": 0.1, "runs": len(s), "warmup": 5, "throughput_per_s": 1e3 / s[len(s) // 2],
           "samples_ms": samples}
    r = {"ok": True, "device": device, "emulated": emulated, "timestamp": "2026-12-01T10:00:00+00:00",
         "artifact": artifact, "format": "onnx", "precision": "int8", "runtime": {"name": "onnxruntime", "version": "1.32"},
         "load_ms": 12.0, "first_ms": 3.0, "latency_ms": lat, "memory_mb": {"peak_rss": 80.0},
         "env": {"machine": "aarch64", "cpu_model": "Cortex-A72", "cpu_count": 4, "threads": 4, "python": "3.11"},
         "verdicts": [{"budget": "latency_p50_ms", "limit": 5.0, "value": lat["p50"], "ok": lat["p50"] <= 5.0,
                       "artifact": artifact, "note": f"on {device}"}]}
    if profile:
        r["op_profile"] = profile
    r["passed"] = all(v["ok"] is not False for v in r["verdicts"])
    return r


def synthetic_build(root: Path, name: str = "net", scale: float = 1.0, devices: dict | None = None,
                    accuracy: float = 91.0, size: int = 400_000) -> Path:
    """A build directory with a manifest holding every section the page draws, and bench results."""
    root.mkdir(parents=True, exist_ok=True)
    spec = TensorSpec(name="image", shape=[1, 3, 16, 16], layout="NCHW")
    outs = [TensorSpec(name="logits", shape=[1, 10]), TensorSpec(name="boxes", shape=[1, 4])]

    def art(path, fmt, precision, p50, sqnr):
        samples = [round(p50 * scale * (1 + 0.02 * (i % 7)), 4) for i in range(40)]
        return Artifact(path=path, format=fmt, precision=precision, sha256="0" * 64,
                        size_bytes=size if precision == "int8" else 4 * size, inputs=[spec.model_copy(update={"shape": ["batch", 3, 16, 16]})],
                        outputs=outs, notes=[f"peak memory {70 + p50:.1f} MB, load 20 ms"],
                        metrics=ArtifactMetrics(accuracy=accuracy, agreement=99.0, sqnr_db=sqnr, samples=200,
                                                outputs={"logits": {"sqnr_db": sqnr, "cosine": 0.999, "max_abs_diff": 0.01},
                                                         "boxes": {"sqnr_db": sqnr + 3, "cosine": 0.998, "max_abs_diff": 0.02}},
                                                latency_ms=LatencyMs(p50=p50 * scale, p90=p50 * scale * 1.1, runs=40, threads=2,
                                                                     measured_on="x86_64", samples_ms=samples)))
    ranking = [{"node": f"/conv{i}/Conv", "op": "Conv", "sqnr_db": 30.0 - i, "lost_db": float(i)} for i in range(12)]
    m = Manifest(edgepack_version="0.1.0", name=name, created=datetime.now(timezone.utc).isoformat(),
                 target={"name": "rpi", "description": "Pi 4", "arch": "aarch64", "runtime": "onnxruntime", "threads": 4},
                 inputs=[spec], outputs=outs, primary="model.int8.onnx",
                 artifacts=[art("model.fp32.onnx", "onnx", "fp32", 4.0, 120.0), art("model.int8.onnx", "onnx", "int8", 1.5, 31.0),
                            art("model.int8.tflite", "tflite", "int8", 1.8, 29.0)],
                 verdicts=[Verdict(budget="size_mb", limit=1.0, value=size / 1e6, ok=True),
                           Verdict(budget="max_accuracy_drop", limit=0.5, value=0.9, ok=False, note="drop in top-1 points"),
                           Verdict(budget="latency_p50_ms", limit=5.0, value=1.5, ok=None, note="measured off-target")],
                 passed=False, versions={"edgepack": "0.1.0"},
                 stages={"prune": {"requested": {"ratio": 0.5}, "ratio": 0.5, "importance": "l2", "global_pruning": False,
                                   "round_to": 8, "iterative_steps": 1, "input_shapes": [[1, 3, 16, 16]],
                                   "output_shapes": [[1, 10], [1, 4]], "ignored_layers": [], "macs_before": 4_000_000,
                                   "macs_after": 1_100_000, "macs_reduction": 3.64, "params_before": 9000, "params_after": 2500,
                                   "layers": [{"name": "body.0", "type": "Conv2d", "in_before": 3, "in_after": 3, "out_before": 32,
                                               "out_after": 16, "macs_before": 3_900_000, "macs_after": 1_000_000},
                                              {"name": "head", "type": "Linear", "in_before": 32, "in_after": 16, "out_before": 10,
                                               "out_after": 10, "macs_before": 320, "macs_after": 160}]},
                         "quantize": {"activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True, "method": "MinMax",
                                      "calibration_samples": 64, "seconds": 1.0, "sensitivity": list(reversed(ranking)),
                                      "fallback": {"ranking": ranking[-3:]}},
                         # as edgepack.tflite.int8_report returns it: the ranking under "ops"
                         "tflite": {"sensitivity": {"samples": 16, "ops": [
                             {"op": "CONV_2D", "name": "t/conv", "module": "body.0 (Conv2d)", "sqnr_db": 25.0, "lost_db": 2.5},
                             {"op": "FULLY_CONNECTED", "name": "t/fc", "module": "head (Linear)", "sqnr_db": 27.0,
                              "lost_db": 4.0}]}}})
    bench = root / "bench"
    bench.mkdir(exist_ok=True)
    for i, (device, samples) in enumerate((devices or {}).items()):
        r = _result(device, "model.int8.onnx", samples,
                    profile=[{"op": "QLinearConv", "calls": 90, "total_ms": 60.0, "share": 0.8, "ms_per_run": 2.0},
                             {"op": "Transpose", "calls": 30, "total_ms": 15.0, "share": 0.2, "ms_per_run": 0.5}] if i == 0 else None)
        r["result_file"] = f"bench/{device}-{i}.json"
        (root / r["result_file"]).write_text(json.dumps(r))
        m.bench.append({"device": device, "emulated": False, "timestamp": r["timestamp"], "artifact": r["artifact"],
                        "runtime": r["runtime"], "threads": 4, "machine": "aarch64", "p50_ms": r["latency_ms"]["p50"],
                        "p90_ms": r["latency_ms"]["p90"], "p99_ms": r["latency_ms"]["p99"], "peak_rss_mb": 80.0,
                        "passed": r["passed"], "verdicts": r["verdicts"], "result_file": r["result_file"]})
    write_json_atomic(root / "manifest.json", m)
    return root


def images(page: str) -> list[tuple[str, Image.Image]]:
    found = []
    for src, alt in IMG.findall(page):
        assert src.startswith("data:image/png;base64,"), src[:60]
        found.append((alt, Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))))
    return found


def test_page_is_self_contained_and_draws_every_section(tmp_path):
    b = synthetic_build(tmp_path / "b", devices={"pi-a": [2.0 + 0.01 * i for i in range(50)],
                                                 "pi-b": [3.0 + 0.02 * i for i in range(30)]})
    page = write_html(b).read_text()
    # Nothing to fetch: no scripts, stylesheets, fonts or URLs; every image is inline.
    assert not re.search(r"<script|<link|@import|@font-face|url\(|https?://|src=\"//", page)
    figs = dict(images(page))
    assert set(figs) == {"latency distribution of every artifact", "latency distribution of every device result",
                         "operator time profile on pi-a", "channels per layer before and after pruning",
                         "ONNX int8: SQNR lost per node", "TFLite int8: SQNR lost per op"}
    assert all(im.format == "PNG" and im.width > 300 and im.height > 100 for im in figs.values())
    # Per-layer MACs in the record: a second panel beside the channels.
    assert figs["channels per layer before and after pruning"].width > 1.2 * figs["operator time profile on pi-a"].width
    assert '<td class="fail">FAIL</td>' in page and '<td class="pass">pass</td>' in page
    assert '<td class="nj">not judged</td>' in page and 'class="badge fail">FAIL' in page
    # Devices side by side: one row each, with the p50 of its own samples.
    assert re.search(r"<td[^>]*>pi-a</td>.*?<td[^>]*>2\.250</td>", page) and re.search(r"<td[^>]*>pi-b</td>.*?3\.300", page)
    # Worst node first, from the full sensitivity list (not the fallback's shortlist).
    onnx_table = page.split("ONNX int8: SQNR lost per node")[-1]
    assert [int(n) for n in re.findall(r"/conv(\d+)/Conv", onnx_table)[:10]] == list(range(11, 1, -1))
    assert "head (Linear)" in page.split("TFLite int8")[-1].split("body.0 (Conv2d)")[0]
    assert ">boxes<" in page and ">1x3x16x16<" in page and ">batchx3x16x16<" in page  # timed vs declared
    assert "4,000,000 → 1,100,000" in page and "body.0" in page


def test_sensitivity_falls_back_to_the_fallback_ranking(tmp_path):
    m = read_manifest(synthetic_build(tmp_path / "b"))
    del m.stages["quantize"]["sensitivity"], m.stages["tflite"]
    [(title, rows)] = sensitivity_lists(m)
    assert "fallback" in title and [r["node"] for r in rows] == ["/conv9/Conv", "/conv10/Conv", "/conv11/Conv"]
    m.stages = {}
    m.bench = []
    page = render_html(tmp_path / "b", m)  # an old manifest: no samples, no stages: the page still renders
    assert len(images(page)) == 1 and "Per-layer int8 sensitivity" not in page


def test_write_reports_writes_the_html_beside_the_markdown(tmp_path):
    b = synthetic_build(tmp_path / "b")
    write_reports(b, read_manifest(b), {})
    assert (b / "report.md").exists() and (b / HTML).read_text().startswith("<!DOCTYPE html>")


def test_report_command_regenerates_both_after_a_real_bench(tmp_path, monkeypatch):
    from conftest_devices import local_device, make_build
    from edgepack.devices import bench
    b = make_build(tmp_path / "build")
    bench(b, local_device(tmp_path / "devices"), runs=12, warmup=2, profile=True)
    code, out, err = run_cli("report", str(b), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["device_results"] == 1 and doc["opened"] is None
    page = Path(doc["report_html"]).read_text()
    assert {"latency distribution of every device result", "operator time profile on loc"} <= {a for a, _ in images(page)}
    md = Path(doc["report_md"]).read_text()
    assert md.count("## On-device benchmark: loc") == 1 and "## Versions" in md

    opened = []

    class Browser:
        def open(self, url):
            opened.append(url)
            return True
    monkeypatch.setattr("webbrowser.get", lambda: Browser())
    code, out, _ = run_cli("report", str(b), "--open")
    assert code == 0 and opened == [(b / HTML).resolve().as_uri()]

    import webbrowser

    def no_browser():
        raise webbrowser.Error("could not locate runnable browser")
    monkeypatch.setattr("webbrowser.get", no_browser)
    code, out, err = run_cli("report", str(b), "--open")
    assert code == 0 and "no browser available here" in err


def test_report_on_a_directory_that_is_not_a_build(tmp_path):
    code, _, err = run_cli("report", str(tmp_path))
    assert code == 2 and "not an edgepack build directory" in err


# --- headless Chromium over the DevTools protocol (a pipe: no websocket library, no port) -------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-pipe"]


class Chromium:
    """Chromium with --remote-debugging-pipe: it reads DevTools commands on fd 3 and answers on
    fd 4, one NUL-terminated JSON message each."""

    def __init__(self, exe: str, user_data_dir: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds():  # dup above 4 first, so placing them on 3 and 4 cannot clobber each other
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.events = b"", 0, []

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if not select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}} | ({"sessionId": session} if session else {})
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self._id:
                assert "error" not in m, m
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str, session: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self._recv(deadline))

    def visit(self, url: str) -> dict:
        """Load `url` in a new tab; what it requested, logged and drew, and a full-page screenshot."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=s)
        self.call("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": 900, "deviceScaleFactor": 1,
                                                         "mobile": False}, s)
        self.call("Page.navigate", {"url": url}, s)
        self.wait_for("Page.loadEventFired", s)
        imgs = self.call("Runtime.evaluate", {"expression": "Promise.all(Array.from(document.images).map(i => "
                                              "i.decode().then(() => [i.alt, i.naturalWidth], () => [i.alt, 0])))",
                                              "awaitPromise": True, "returnByValue": True}, s)["result"]["value"]
        title = self.call("Runtime.evaluate", {"expression": "document.title", "returnByValue": True}, s)["result"]["value"]
        height = self.call("Page.getLayoutMetrics", session=s)["cssContentSize"]["height"]
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": 1200, "height": height, "scale": 1}},
                         s)["data"]
        ev = [e for e in self.events if e.get("sessionId") == s]
        p = [e["params"] for e in ev]
        return {"title": title, "images": imgs, "screenshot": base64.b64decode(shot),
                "requests": [q["request"]["url"] for e, q in zip(ev, p) if e["method"] == "Network.requestWillBeSent"],
                "errors": [json.dumps(q)[:300] for e, q in zip(ev, p)
                           if (e["method"] == "Runtime.consoleAPICalled" and q["type"] in ("error", "assert"))
                           or e["method"] == "Runtime.exceptionThrown"
                           or (e["method"] == "Log.entryAdded" and q["entry"]["level"] == "error")]}

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def _leaves_the_file(page_url: str, requests: list[str]) -> list[str]:
    return [u for u in requests if u != page_url and not u.startswith("data:")]


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium(tmp_path, monkeypatch):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (scripts/install-system-deps.sh installs Debian's chromium)")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # only the shipped `local` device
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, _, err = run_cli("build", "--prune", "0.5", "--finetune-epochs", "2", "--device", "local", "--out",
                           str(tmp_path / "dist"), "--latency-runs", "20", "-q")
    assert code == 0, err
    build = tmp_path / "dist" / "digits-cnn-x86"
    code, _, err = run_cli("bench", str(build), "--device", "local", "--profile", "--runs", "30")
    assert code == 0, err
    code, out, err = run_cli("report", str(build), "--json")
    assert code == 0, err
    page = Path(json.loads(out)["report_html"])
    # The negative control: the same page with an external image and a console error must be caught.
    bad = tmp_path / "bad.html"
    bad.write_text(page.read_text().replace("</body>", '<img src="http://127.0.0.1:9/x.png" alt="remote">'
                                                       '<script>console.error("planted")</script></body>'))
    browser = Chromium(exe, Path(tempfile.mkdtemp(prefix="edgepack-chromium-", dir=tmp_path)))
    try:
        seen = browser.visit(page.as_uri())
        control = browser.visit(bad.as_uri())
    finally:
        browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report_html.png"
    shot.write_bytes(seen["screenshot"])
    shutil.copy(page, ARTIFACTS / "report.html")
    print(f"screenshot of report.html: {shot}")
    assert seen["title"] == "digits-cnn for x86: PASS"
    alts = {alt for alt, _ in seen["images"]}
    assert {"latency distribution of every artifact", "latency distribution of every device result",
            "operator time profile on local", "channels per layer before and after pruning"} <= alts
    assert all(width > 0 for _, width in seen["images"]), seen["images"]
    assert _leaves_the_file(page.as_uri(), seen["requests"]) == [], seen["requests"]
    assert seen["errors"] == []
    assert _leaves_the_file(bad.as_uri(), control["requests"]) == ["http://127.0.0.1:9/x.png"]
    assert ["remote", 0] in control["images"] and any("planted" in e for e in control["errors"])
    im = Image.open(io.BytesIO(seen["screenshot"]))
    assert im.width == 1200 and im.height > 2000  # the whole page, every section
