"""Split any traceable model into pipeline stages with multi-tensor boundaries.

    from layerpipe.split import split_model
    split = split_model(gpt2, split_points=["transformer.h.2"],
                        example_kwargs={"input_ids": ids, "attention_mask": mask})
    out = split.stages[0](input_ids=ids, attention_mask=mask)   # tuple: boundary 0's values
    out = split.stages[1](*out)                                 # what gpt2(...) returns

`layerpipe.split.model` defines the calling convention, `layerpipe.split.partition` how the graph
is cut, `layerpipe.split.trace` how it is captured, `layerpipe.split.chain` a reference forward and
backward through the cut stages (the protocol an engine follows).
"""
from layerpipe.split.chain import ChainResult, run_chained
from layerpipe.split.model import Boundary, SplitModel, StageModule, ValueSpec, split_model

__all__ = ["Boundary", "ChainResult", "SplitModel", "StageModule", "ValueSpec", "run_chained", "split_model"]
