"""Split a small, randomly initialised Hugging Face GPT-2 into two pipeline stages and train it.

    PYTHONPATH=src python examples/hf_gpt2_split.py

Shows what `layerpipe.split.split_model` gives an engine: the stage modules, the values
crossing the boundary (with shapes from one example forward), the tied embedding, and a few
SGD steps driven stage by stage with `run_chained` (the protocol a pipeline engine runs).
Then trains the model pipelined with `layerpipe.Pipeline` (split at "transformer.h.2",
`stash` weights, Adam): the tied embedding is owned by stage 0, which applies the sum of
both stages' gradients. Needs `transformers`; downloads nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from layerpipe import Pipeline
from layerpipe.split import run_chained, split_model


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 128, (4, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded sequence
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}

    split = split_model(model, split_points=["transformer.h.2"], example_kwargs=inputs)
    print(split)
    for k, specs in enumerate(split.boundary_specs or []):
        print(f"boundary {k}:")
        for s in specs:
            print(f"  {s.name:16s} per-sample {str(s.per_sample_shape):14s} {str(s.dtype):14s} grad={s.requires_grad}")
    print("tied parameters (name -> stages):", split.tied_params())
    for k in range(split.num_stages):
        print(f"stage {k}: owns {len(split.owned_parameters(k))} parameters, reads {len(split.stage_parameters(k))}")

    # the last stage returns what the model returns (a CausalLMOutput); the loss reads .logits
    def loss_fn(out) -> torch.Tensor:
        logits = out.logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    params = dict(model.named_parameters())
    for step in range(5):
        result = run_chained(split, (), inputs, loss_fn)
        with torch.no_grad():  # one owner per tied weight: apply the sum of its users' gradients
            for name, grad in result.summed_grads().items():
                params[name].sub_(0.3 * grad)
        print(f"step {step}: loss {result.loss.item():.4f}")
    with torch.no_grad():
        print(f"model's own loss after training through the stages: {loss_fn(model(**inputs)).item():.4f}")

    # pipelined training: 2 stages, delays (2, 0); microbatches of random sequences
    pipe = Pipeline(model, split_points=["transformer.h.2"], weights="stash", example_inputs=inputs,
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=3e-3),
                    loss_fn=lambda out, y: F.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten()),
                    clip_grad_norm=1.0)
    print(f"pipeline: {pipe.num_stages} stages, delays {pipe.delays}, split points {list(pipe.spec.split_points)}")
    data = [torch.randint(0, 128, (4, 16)) for _ in range(4)]  # a tiny corpus to memorise
    losses = []
    for tick in range(40):
        batch = data[tick % len(data)]
        info = pipe.step({"input_ids": batch, "attention_mask": torch.ones_like(batch), "use_cache": False}, batch)
        losses += [loss.item() for loss in info.losses.values()]
    pipe.flush()
    print(f"pipelined: loss {sum(losses[:4]) / 4:.4f} over the first 4 microbatches, "
          f"{sum(losses[-4:]) / 4:.4f} over the last 4")


if __name__ == "__main__":
    main()
