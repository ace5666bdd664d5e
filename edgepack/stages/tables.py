"""What the compression stages share about their `[compress.NAME]` tables: torch models only,
and one way of saying which option of the table is wrong."""
from __future__ import annotations

from typing import Callable

from pydantic import BaseModel, ValidationError

from ..errors import EdgepackError
from .context import BuildContext


def require_torch(ctx: BuildContext, what: str, drop: str) -> None:
    """`what` ("weight clustering needs a PyTorch model: it fine-tunes the weights") refuses an ONNX input."""
    if ctx.model.kind != "torch":
        raise EdgepackError(f"{what}, and {ctx.model.source or 'the input'} is an ONNX file",
                            f"build from the PyTorch model (--model file.py:factory --weights ...), or drop {drop}")


def validate_table(model: type[BaseModel], options: dict | None, table: str, example: str,
                   check: Callable[[BaseModel], object] | None = None) -> BaseModel:
    """`options` as `model`, or an EdgepackError listing every wrong key of `[compress.<table>]`."""
    try:
        cfg = model.model_validate(options or {})
        if check is not None:
            check(cfg)
    except ValidationError as e:
        lines = [f"  - {'.'.join(map(str, err['loc'])) or table}: "
                 f"{'unknown option' if err['type'] == 'extra_forbidden' else err['msg']}" for err in e.errors()]
        raise EdgepackError(f"invalid [compress.{table}] options:\n" + "\n".join(lines), f"e.g. {example}") from e
    return cfg


def user_metric(ctx: BuildContext):
    """The build's --metric for the fine-tuning stages (edgepack.prune.finetune.UserMetric: it
    picks the epoch kept and is the figure they record), or None."""
    if ctx.metric is None:
        return None
    from ..prune.finetune import UserMetric  # torch: only the stages that train ask
    return UserMetric(ctx.metric[0], ctx.metric[1], tuple(ctx.model.outputs))
