"""`PruneRecord`: what pruning did, as JSON for the manifest and markdown for report.md."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

MAX_TABLE_ROWS = 40  # report.md stays readable for deep models; the JSON keeps every layer


@dataclass
class LayerChange:
    name: str
    type: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int


@dataclass
class PruneRecord:
    requested: dict  # the goal: {"ratio": 0.5} | {"macs_target": 0.5} | {"latency_p50_ms": 3.0}
    ratio: float  # the channel ratio finally applied (found by search for macs/latency goals)
    importance: str
    global_pruning: bool
    round_to: int | None
    iterative_steps: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    input_shapes: list[list[int]]
    output_shapes: list[list[int]]
    ignored_layers: list[str]
    input_dtypes: list[str] = field(default_factory=list)  # torch dtype names; float32 when empty
    # groups undone because pruning them was not exact: [{"layers": [...], "reason": "..."}]
    protected: list[dict] = field(default_factory=list)
    layers: list[LayerChange] = field(default_factory=list)
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention module -> [before, after]
    attributes: dict[str, int] = field(default_factory=dict)  # width attributes set to pruned widths
    sliced: list = field(default_factory=list)  # per-head parameters: [[path, dim, kept indices]]
    groups_checked: int = 0  # channel groups verified exact by masking (see prune/verify.py)
    groups_unchecked: int = 0  # groups with channel-mixing layers, pruned unverified
    history: list = field(default_factory=list)  # torch-pruning history, replayed by load_pruned
    finetune: list[dict] = field(default_factory=list)  # one summary per fine-tuning run
    latency_search: list[dict] = field(default_factory=list)  # [{"ratio", "p50_ms"}] measured candidates
    accuracy: dict = field(default_factory=dict)  # {"metric", "before", "pruned", "finetuned"} on eval
    warnings: list[str] = field(default_factory=list)
    peak_rss_mb: int | None = None  # resident memory peak of the pruning run (the last one, for searches)
    prune_seconds: float | None = None

    @property
    def macs_reduction(self) -> float:
        return self.macs_before / max(1, self.macs_after)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["macs_reduction"] = round(self.macs_reduction, 3)
        return d

    def markdown(self) -> str:
        goal = ", ".join(f"{k}={v}" for k, v in self.requested.items())
        lines = [
            "## Pruning",
            "",
            f"Structured channel pruning ({goal}): channel ratio {self.ratio:.3f}, importance "
            f"`{self.importance}`, {'global' if self.global_pruning else 'per-layer'} ranking, "
            f"channels rounded to {self.round_to or 1}, {self.iterative_steps} step(s).",
            "",
            "| | before | after | change |",
            "|---|---:|---:|---:|",
            f"| MACs | {_si(self.macs_before)} | {_si(self.macs_after)} | {self.macs_reduction:.2f}x fewer |",
            f"| params | {_si(self.params_before)} | {_si(self.params_after)} | "
            f"{self.params_before / max(1, self.params_after):.2f}x fewer |",
            "",
        ]
        changed = [c for c in self.layers if (c.in_before, c.out_before) != (c.in_after, c.out_after)]
        lines += [f"{len(changed)} of {len(self.layers)} conv/linear layers changed width "
                  f"(ignored: {', '.join(f'`{n}`' for n in self.ignored_layers) or 'none'}); "
                  f"{self.groups_checked} channel group(s) verified exact by masking"
                  + (f", {self.groups_unchecked} unverifiable" if self.groups_unchecked else "") + ".", ""]
        if self.protected:
            lines += [f"Protected (left unpruned because pruning them was not exact, typically channels "
                      f"crossing a channel shuffle or a reshape): "
                      + "; ".join(f"{', '.join(f'`{n}`' for n in p['layers']) or 'a group'} ({p['reason']})"
                                  for p in self.protected[:MAX_TABLE_ROWS])
                      + (f"; ... {len(self.protected) - MAX_TABLE_ROWS} more in manifest.json"
                         if len(self.protected) > MAX_TABLE_ROWS else "") + ".", ""]
        if self.attributes:
            lines += ["Width attributes kept in step: " + ", ".join(f"`{k}` = {v}" for k, v in self.attributes.items())
                      + ".", ""]
        if changed:
            lines += ["| layer | type | in channels | out channels |", "|---|---|---:|---:|"]
            for c in changed[:MAX_TABLE_ROWS]:
                lines.append(f"| `{c.name}` | {c.type} | {_arrow(c.in_before, c.in_after)} | "
                             f"{_arrow(c.out_before, c.out_after)} |")
            if len(changed) > MAX_TABLE_ROWS:
                lines.append(f"| ... {len(changed) - MAX_TABLE_ROWS} more in manifest.json | | | |")
            lines.append("")
        if self.heads:
            lines += ["Attention heads: " + ", ".join(f"`{n}` {b} → {a}" for n, (b, a) in self.heads.items()), ""]
        if self.peak_rss_mb is not None:
            lines += [f"Pruning took {self.prune_seconds:.1f} s, peak resident memory {self.peak_rss_mb} MB.", ""]
        if self.latency_search:
            lines += ["Latency search (measured, ms p50): " + ", ".join(
                f"ratio {c['ratio']:.3f} → {c['p50_ms']:.2f}" for c in self.latency_search), ""]
        acc = self.accuracy
        if acc.get("before") is not None:
            steps = [f"{format_score(acc['before'], acc.get('metric'))} before"]
            steps += [f"{format_score(acc[k], acc.get('metric'))} {label}" for k, label in (("pruned", "after pruning"),
                      ("finetuned", "after fine-tuning")) if acc.get(k) is not None]
            lines += [f"Eval {acc['metric']}: " + " → ".join(steps) + ".", ""]
        for ft in self.finetune:
            lines.append(_finetune_line(ft))
        if self.finetune:
            lines.append("")
        lines += [f"> warning: {w}" for w in self.warnings]
        return "\n".join(lines).rstrip() + "\n"


def format_score(value, name: str | None, missing: str = "-") -> str:
    """A figure of fine-tuning's `evaluate`: top-1 as a percentage, the user's metric as it is."""
    if value is None:
        return missing
    return f"{100 * value:.2f}%" if name is None or name.startswith("top-1") else f"{value:.4g}"


def _finetune_line(ft: dict) -> str:
    kind = "distillation" if ft.get("distill") else "plain"
    acc = ""
    if ft.get("eval_acc_before") is not None and ft.get("eval_acc_after") is not None:
        name = ft.get("eval_metric")
        acc = (f", eval {name if name and not name.startswith('top-1') else 'top-1'} "
               f"{format_score(ft['eval_acc_before'], name)} → {format_score(ft['eval_acc_after'], name)}")
    stop = f" (stopped: {ft['stopped']})" if ft.get("stopped") else ""
    return (f"- {ft.get('phase', 'fine-tuning')} ({kind}): {ft['epochs_run']} epoch(s) in {ft['seconds']:.1f} s{acc}{stop}")


def _arrow(before: int, after: int) -> str:
    return str(before) if before == after else f"{before} → {after}"


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
