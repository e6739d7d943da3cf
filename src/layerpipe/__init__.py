"""layerpipe: LayerPipe2 multistage pipelined training on PyTorch.

    import torch, layerpipe
    pipe = layerpipe.Pipeline(model, stages=[1, 3, 2, 1], weights="ema",
                              optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                              loss_fn=torch.nn.functional.cross_entropy)
    for x, y in batches:
        pipe.step(x, y)      # one tick
    pipe.flush()             # drain every in-flight gradient

    # your own model from a script, in one process or one per stage (layerpipe launch --nproc K)
    result = layerpipe.train_pipeline(make_model, make_data, loss_fn, split_points=["transformer.h.2"])
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from layerpipe.errors import LayerpipeError, PlanError

__version__ = "0.1.0"
__all__ = ["LayerpipeError", "PlanError", "Pipeline", "__version__", "train_pipeline"]

if TYPE_CHECKING:
    from layerpipe.cli.script import train_pipeline
    from layerpipe.engine.single import Pipeline


def __getattr__(name: str) -> Any:
    # torch is imported lazily so that `layerpipe plan` starts fast
    if name == "Pipeline":
        from layerpipe.engine.single import Pipeline

        return Pipeline
    if name == "train_pipeline":
        from layerpipe.cli.script import train_pipeline

        return train_pipeline
    raise AttributeError(name)
