"""`edgepack compare`: builds side by side, every delta against the first build."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from edgepack.compare import compare_builds, markdown
from edgepack.errors import EdgepackError
from test_report_html import synthetic_build


@pytest.fixture
def two_builds(tmp_path):
    """A baseline and a change that is smaller and faster but less accurate; one device each, and
    a device only the second build was benchmarked on."""
    a = synthetic_build(tmp_path / "base" / "net", devices={"pi": [4.0] * 20}, accuracy=91.0, size=400_000)
    b = synthetic_build(tmp_path / "pruned" / "net", scale=0.5, devices={"pi": [2.0] * 20, "pi5": [1.0] * 10},
                        accuracy=89.5, size=100_000)
    return a, b


def _row(cmp: dict, group: str, what: str) -> dict:
    [row] = [r for r in cmp["rows"] if r["group"] == group and r["what"] == what]
    return row


def test_deltas_against_the_baseline(two_builds):
    cmp = compare_builds(list(two_builds))
    assert [b["label"] for b in cmp["builds"]] == ["base/net", "pruned/net"]  # same dir name: parent added
    size = _row(cmp, "model.int8.onnx", "size MB")
    assert size["values"] == [0.4, 0.1] and size["deltas"][1] == {"abs": -0.3, "pct": -75.0}
    assert size["verdicts"] == [None, "better"]
    acc = _row(cmp, "model.int8.onnx", "top-1 %")
    assert acc["deltas"][1]["abs"] == pytest.approx(-1.5) and acc["verdicts"][1] == "worse"
    p50 = _row(cmp, "model.int8.onnx", "p50 ms (build machine)")
    assert p50["values"] == [1.5, 0.75] and p50["verdicts"][1] == "better"
    sqnr = _row(cmp, "model.int8.onnx", "SQNR dB")
    assert sqnr["deltas"][1] == {"abs": 0.0, "pct": 0.0} and sqnr["verdicts"][1] == "same"
    dev = _row(cmp, "on pi · model.int8.onnx", "p50 ms")
    assert dev["values"] == [4.0, 2.0] and dev["deltas"][1]["pct"] == -50.0
    only_b = _row(cmp, "on pi5 · model.int8.onnx", "p50 ms")
    assert only_b["values"] == [None, 1.0] and only_b["deltas"][1] is None  # nothing to compare with
    drop = _row(cmp, "budget", "max_accuracy_drop verdict")
    assert drop["values"] == ["FAIL", "FAIL"]
    met = _row(cmp, "build", "budgets met (devices)")
    assert met["values"] == ["1 of 1", "2 of 2"]


def test_markdown_and_html_files(two_builds, tmp_path):
    a, b = two_builds
    code, out, err = run_cli("compare", str(a), str(b), "--out", str(tmp_path / "cmp.md"))
    assert code == 0, err
    assert "base/net (baseline)" in out and "-75.0%" in out  # the rich table on stdout
    md = (tmp_path / "cmp.md").read_text()
    assert "| model.int8.onnx | size MB | 0.4 | 0.1 (-0.3, -75.0%) better |" in md
    assert "| model.int8.onnx | top-1 % | 91 | 89.5 (-1.5, -1.6%) **worse** |" in md
    code, _, err = run_cli("compare", str(a), str(b), "--out", str(tmp_path / "cmp.html"))
    assert code == 0, err
    page = (tmp_path / "cmp.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and '<td class="better">0.1 (-0.3, -75.0%)</td>' in page
    assert '<td class="worse">89.5 (-1.5, -1.6%)</td>' in page and "http" not in page


def test_json_is_the_comparison(two_builds):
    code, out, err = run_cli("compare", *map(str, two_builds), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["baseline"] == str(two_builds[0]) and doc["written"] is None
    assert doc == json.loads(json.dumps(compare_builds(list(two_builds)) | {"written": None}))


def test_three_builds_compare_each_with_the_first(two_builds, tmp_path):
    c = synthetic_build(tmp_path / "third", scale=2.0)
    cmp = compare_builds([*two_builds, c])
    p50 = _row(cmp, "model.int8.onnx", "p50 ms (build machine)")
    assert p50["values"] == [1.5, 0.75, 3.0] and p50["verdicts"] == [None, "better", "worse"]
    assert "third (baseline)" not in markdown(cmp) and "base/net (baseline)" in markdown(cmp)


def test_bad_input(two_builds, tmp_path):
    with pytest.raises(EdgepackError, match="at least two"):
        compare_builds([two_builds[0]])
    code, _, err = run_cli("compare", str(two_builds[0]), str(tmp_path))
    assert code == 2 and "not an edgepack build directory" in err
    code, _, err = run_cli("compare", *map(str, two_builds), "--out", str(tmp_path / "no" / "x.md"))
    assert code == 2 and "is not a directory" in err
