"""`PruneConfig`: what to prune, how to rank channels, and how to fine-tune afterwards."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import EdgepackError

Importance = Literal["l1", "l2", "bn_scale", "taylor", "entropy", "random"]


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(5, ge=0)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    patience: int | None = Field(2, ge=1, description="epochs without eval improvement before stopping")
    max_minutes: float | None = Field(None, gt=0, description="wall-clock bound for all fine-tuning")
    distill: bool = True
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation loss; 1-alpha goes to CE")
    threads: int | None = Field(None, ge=1, description="torch threads while fine-tuning; default: torch's choice")


class SlimmingConfig(BaseModel):
    """Sparsity training before pruning (network slimming, Liu et al. 2017): fine-tuning with an
    L1 penalty on BatchNorm scales (`on = "bn_scale"`) or a group-norm penalty on whole channel
    groups (`on = "group_norm"`), torch-pruning's BNScalePruner / GroupNormPruner `regularize`
    hooks, so the channels it drives to zero are the ones pruned (importance bn_scale / l2)."""
    model_config = ConfigDict(extra="forbid")

    l1: float = Field(1e-4, gt=0, description="penalty coefficient added to the gradients each step")
    epochs: int = Field(2, ge=1, description="sparsity-training epochs before pruning")
    on: Literal["bn_scale", "group_norm"] = "bn_scale"
    lr: float | None = Field(None, gt=0, description="default: the fine-tuning lr")


class PruneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ratio: float | None = Field(None, description="fraction of channels removed per group, in (0, 1)")
    macs_target: float | None = Field(None, description="fraction of the original MACs to keep, in (0, 1)")
    to_latency: bool = Field(False, description="search the ratio that meets the target's latency budget")
    importance: Importance = "l2"
    global_pruning: bool = False
    ignore_layers: list[str] = []
    round_to: int | None = Field(None, ge=1, description="channel multiple; default: target simd_width")
    iterative_steps: int = Field(1, ge=1)
    taylor_batches: int = Field(4, ge=1, description="labelled batches used to estimate Taylor importance")
    entropy_batches: int = Field(4, ge=1, description="batches whose activations rank channels by entropy")
    slimming: SlimmingConfig | None = Field(None, description="sparsity training before pruning (network slimming)")
    max_ratio: float = Field(0.9, gt=0, lt=1, description="upper bound of the ratio search")
    max_memory_mb: int | None = Field(None, ge=1, description="resident memory (MB) the process may reach while "
                                      "pruning; default: its size at the start plus 3/4 of the memory available")
    max_prune_minutes: float | None = Field(30.0, gt=0, description="wall-clock bound for one pruning run "
                                            "(graph, ranking, checks; not fine-tuning)")
    finetune: FinetuneConfig = FinetuneConfig()

    @model_validator(mode="after")
    def _one_goal(self) -> "PruneConfig":
        goals = [self.ratio is not None, self.macs_target is not None, self.to_latency]
        if sum(goals) > 1:
            raise ValueError("give only one of ratio, macs_target, to_latency")
        for name in ("ratio", "macs_target"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                raise ValueError(f"{name} must be strictly between 0 and 1, got {v}")
        return self

    @property
    def enabled(self) -> bool:
        return self.ratio is not None or self.macs_target is not None or self.to_latency


def make_config(**fields) -> PruneConfig:
    """Build a `PruneConfig`, turning validation failures into an `EdgepackError`."""
    try:
        return PruneConfig.model_validate(fields)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "prune"
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            lines.append(f"  - {loc}: {msg}")
        raise EdgepackError("invalid pruning options:\n" + "\n".join(lines),
                            "e.g. ratio=0.5 removes half of each layer's channels; ratios must be in (0, 1)") from e
