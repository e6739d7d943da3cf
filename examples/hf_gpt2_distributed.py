"""Train a small Hugging Face GPT-2 as it is, one pipeline stage per process.

    layerpipe launch --nproc 2 examples/hf_gpt2_distributed.py        # 2 local processes (gloo)
    torchrun --nproc-per-node 2 examples/hf_gpt2_distributed.py       # the same under torchrun
    python examples/hf_gpt2_distributed.py                            # both stages in this process

Every process runs this script: `layerpipe.train_pipeline` builds the model from the same
seed, cuts it at `transformer.h.2` (traced on the first batch: input_ids, attention_mask,
use_cache=False), keeps its own stage and trains it with the one training loop; the result
comes back on rank 0. The boundary carries two tensors: the hidden states (with their
gradient back) and the causal attention mask (boolean, no gradient). GPT-2 ties its output
layer to the token embedding (`wte`, read by stage 0 and stage 1): stage 0 owns it and
applies the sum of both stages' gradients, and stage 1 receives each new value (and keeps
its own history of it under `stash` or `ema`), so two processes train the numbers of one.
Needs `transformers`; downloads nothing.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import layerpipe

VOCAB, SEQ = 128, 16


def make_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                        eos_token_id=0,  # tie_word_embeddings=True, the default: lm_head is wte
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: same numbers anywhere
    return GPT2LMHeadModel(config)


def make_data(n_train: int = 64, n_test: int = 16):
    """Random token sequences that repeat a short pattern (learnable), some left-padded."""
    g = torch.Generator().manual_seed(1)
    n = n_train + n_test
    pattern = torch.randint(0, VOCAB, (n, 4), generator=g)
    ids = pattern.repeat(1, SEQ // 4)
    mask = torch.ones_like(ids)
    pad = torch.randint(0, 4, (n,), generator=g)
    for i, p in enumerate(pad.tolist()):
        mask[i, :p] = 0
    x = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    take = lambda sl: {k: v[sl] if isinstance(v, torch.Tensor) else v for k, v in x.items()}  # noqa: E731
    return {"x_train": take(slice(0, n_train)), "y_train": ids[:n_train],
            "x_test": take(slice(n_train, n)), "y_test": ids[n_train:]}


def lm_loss(out, ids):
    """Next-token cross-entropy on whatever GPT2LMHeadModel returns (a CausalLMOutput)."""
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="stash")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save", default=None, help="write the trained model's state_dict here (rank 0)")
    args = parser.parse_args(argv)
    result = layerpipe.train_pipeline(
        make_model, make_data, lm_loss,
        split_points=["transformer.h.2"],
        weights=args.weights, optimizer="adam", lr=3e-3,
        epochs=args.epochs, batch_size=args.batch_size, threads=args.threads, save=args.save,
    )
    if result is not None:  # rank 0, or the only process
        for record in result.history:
            print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, test loss {record['test_loss']:.4f}")
        print(f"stages {result.stages}, delays {result.delays}, weight history {result.weight_history_bytes} bytes")
    return result


if __name__ == "__main__":
    main()
