"""(f) `muon`: torch.optim.Muon for the matrices, AdamW for the rest, as one optimizer.

Muon orthogonalises a Nesterov-momentum update of every 2-D weight (Newton-Schulz), so each
step has a fixed spectral size whatever the gradient's scale; Zmushko et al. (2026) found it,
with high momentum, far more robust to delayed gradients than AdamW. 1-D tensors (biases,
LayerNorm) go to AdamW, and so do the input embeddings and the output layer's matrix
(`io_adamw=True`, the default): Muon is meant for hidden matrices (Jordan et al., 2024, the
Muon write-up; Liu et al., 2025, Moonlight). The pipeline tags those matrices when it builds
its stages (`mark_io_matrices`: every nn.Embedding's weight and the last nn.Linear's); an
untagged parameter list puts every 2-D tensor on Muon. `adjust_lr_fn="match_rms_adamw"` lets
both share one lr (`adamw_lr_scale=X`: the AdamW part at X times it). With `per_delay=True`
Muon's momentum follows the delay rule of `nesterov` (`delay_beta1(momentum, d_k,
momentum_max)`: longer windows on delayed stages); with `delayed_momentum=B` every stage with
d_k > 0 uses momentum B instead (Mitliagkas et al., "Asynchrony begets momentum", 2016: a delay
acts as implicit momentum, so the explicit one may be lowered where the delay is);
`delayed_momentum=depth` sets it by the pipeline's largest delay D, 0.2 + 0.1 D, at most the
undelayed stages' momentum (0.5 at D = 3, 4 stages under the 1F1B timing; 0.9 at D = 7, 8
stages: the best measured at each depth with the recipe's microbatch for that depth);
`delayed_adamw_beta1=B` does the same for the AdamW part's beta1 (0.9 elsewhere).

torch's Muon runs its Newton-Schulz iteration in bfloat16, which is fast on accelerators but
about 170 times slower than AdamW's whole step on CPUs without bfloat16 matrix units (measured:
4.5 s per step for the zoo GPT on this 2-core VM). `ns_dtype="auto"` keeps torch's step
on accelerators and runs the same iteration in float32 on CPU (`muon_float32_step`).
"""
from __future__ import annotations

import math

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from layerpipe.compensate.nesterov import delay_beta1
from layerpipe.compensate.registry import register
from layerpipe.errors import LayerpipeError


#: the `part` of the AdamW param groups (vectors, embeddings, the output layer), for wrappers
#: that treat them apart (`pipemare:adamw=...`)
ADAMW_PART = "adamw"

#: set (True) on the matrices Muon leaves to AdamW: input embeddings, the output layer
IO_MATRIX_ATTR = "_layerpipe_io_matrix"


def mark_io_matrices(modules: Sequence[nn.Module]) -> list[Tensor]:
    """Tag the model's input and output matrices (every nn.Embedding's weight, and the weight
    of the last nn.Linear of the last module) so `MuonAdamW` gives them to AdamW. Returns them."""
    tagged = [m.weight for mod in modules for m in mod.modules() if isinstance(m, nn.Embedding)]
    linears = [m for m in modules[-1].modules() if isinstance(m, nn.Linear)] if modules else []
    if linears:
        tagged.append(linears[-1].weight)
    for p in tagged:
        setattr(p, IO_MATRIX_ATTR, True)
    return tagged


def newton_schulz(g: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """torch.optim.Muon's orthogonalisation, in the dtype of `g`."""
    a, b, c = coefficients
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


@torch.no_grad()
def muon_float32_step(opt: torch.optim.Optimizer) -> None:
    """One step of torch.optim.Muon `opt` (same state, same update) with a float32 iteration."""
    for group in opt.param_groups:
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mom)
            update = p.grad.lerp(buf, mom) if group["nesterov"] else buf
            update = newton_schulz(update.float(), group["ns_coefficients"], group["ns_steps"], group["eps"])
            p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-_adjusted_lr(lr, group["adjust_lr_fn"], p.shape))


def _adjusted_lr(lr: float, fn: str | None, shape: torch.Size) -> float:
    # torch.optim.Muon's rule (torch/optim/_muon.py `_adjust_lr`)
    a, b = shape[:2]
    if fn is None or fn == "original":
        return lr * math.sqrt(max(1, a / b))
    if fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    return lr


class MuonAdamW:
    """Muon on the 2-D parameters plus AdamW on the others, stepped together.

    Exposes the torch.optim.Optimizer surface the engine uses (param_groups, state, step,
    zero_grad, state_dict, load_state_dict); either part may be absent."""

    def __init__(
        self,
        params: Sequence[Tensor],
        lr: float = 1e-3,
        *,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        adamw_weight_decay: float = 0.01,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adjust_lr_fn: str = "match_rms_adamw",
        ns_dtype: str = "auto",
        io_adamw: bool = True,
        adamw_lr_scale: float = 1.0,
    ) -> None:
        muon_cls = getattr(torch.optim, "Muon", None)
        if muon_cls is None:
            raise LayerpipeError(f"the muon optimizer needs torch.optim.Muon (torch >= 2.9); this torch is {torch.__version__}")
        params = list(params)

        def on_muon(p: Tensor) -> bool:
            return p.ndim == 2 and not (io_adamw and getattr(p, IO_MATRIX_ATTR, False))

        matrices = [p for p in params if on_muon(p)]
        rest = [p for p in params if not on_muon(p)]
        self.muon = (
            muon_cls(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True, adjust_lr_fn=adjust_lr_fn)
            if matrices
            else None
        )
        self.adamw = torch.optim.AdamW(rest, lr=lr * adamw_lr_scale, betas=adamw_betas,
                                       weight_decay=adamw_weight_decay) if rest else None
        if self.adamw is not None:  # the training loop's set_lr keeps this ratio to Muon's lr
            for group in self.adamw.param_groups:
                group["lr_scale"] = adamw_lr_scale
                group["part"] = ADAMW_PART
        if ns_dtype not in ("auto", "float32", "bfloat16"):
            raise LayerpipeError(f"muon: ns_dtype must be auto, float32 or bfloat16, got {ns_dtype!r}")
        on_cpu = all(p.device.type == "cpu" for p in matrices)
        self.float32_ns = ns_dtype == "float32" or (ns_dtype == "auto" and on_cpu)

    def _parts(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self._parts() for g in o.param_groups]

    @property
    def state(self) -> dict[Tensor, Any]:
        return {p: s for o in self._parts() for p, s in o.state.items()}

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if self.muon is not None:
            muon_float32_step(self.muon) if self.float32_ns else self.muon.step()
        if self.adamw is not None:
            self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._parts():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict() if self.muon else None, "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])


def depth_momentum(max_delay: int, momentum: float) -> float:
    """The delayed stages' momentum for a pipeline whose largest delay is `max_delay`, at most
    the undelayed stages' `momentum`: 0.2 + 0.1 D, linear through the two measured optima.

    Measured on the zoo GPT with the recipe's microbatch by depth (docs/transformer-diagnosis.md,
    "Fifth session"): at 4 stages (D = 3, microbatch 2) 0.5-0.7 is best and 0.8-0.9 worse; at 8
    (D = 7, microbatch 1) the loss falls steadily from 0.5 to 0.9 (0.9: no reduction). At
    microbatch 4 the 8-stage optimum had been 0.6-0.8; a per-stage rule by each stage's own
    delay was worse at 8 stages. A deeper pipeline wants more momentum on every delayed stage."""
    return min(momentum, max(0.0, (2 + max_delay) / 10))  # exact at 0.5 and 0.9


@register("muon", builds_optimizer=True)
def build_muon(
    params: Sequence[Tensor],
    delay: int,
    *,
    lr: float = 4e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    momentum_max: float = 0.99,
    per_delay: bool = False,
    delayed_momentum: float | str | None = None,
    adamw_weight_decay: float = 0.01,
    ns_dtype: str = "auto",
    io_adamw: bool = True,
    adamw_lr_scale: float = 1.0,
    delayed_adamw_beta1: float | None = None,
    max_delay: int | None = None,
) -> MuonAdamW:
    if per_delay and delayed_momentum is not None:
        raise LayerpipeError("muon: per_delay and delayed_momentum are two rules for the same momentum; give one")
    if delayed_momentum == "depth":
        if max_delay is None:
            raise LayerpipeError("muon: delayed_momentum=depth needs the pipeline's delays (build it through "
                                 "build_optimizer(..., max_delay=) or pipeline_optimizer)")
        delayed_momentum = depth_momentum(max_delay, momentum)
    for key, value in (("momentum", momentum), ("delayed_momentum", delayed_momentum),
                       ("delayed_adamw_beta1", delayed_adamw_beta1)):
        if value is not None and (not isinstance(value, (int, float)) or not 0.0 <= value < 1.0):
            also = " or 'depth'" if key == "delayed_momentum" else ""
            raise ValueError(f"{key} must be a number in [0, 1){also}, got {value!r}")
    mom = delay_beta1(momentum, delay, momentum_max) if per_delay else momentum
    if delayed_momentum is not None and delay > 0:
        mom = delayed_momentum
    if not isinstance(adamw_lr_scale, (int, float)) or adamw_lr_scale <= 0:
        raise ValueError(f"adamw_lr_scale must be a number > 0, got {adamw_lr_scale!r}")
    # the AdamW part's beta1 on delayed stages (the same reasoning as delayed_momentum)
    beta1 = delayed_adamw_beta1 if (delayed_adamw_beta1 is not None and delay > 0) else 0.9
    return MuonAdamW(params, lr, weight_decay=weight_decay, momentum=mom, adamw_weight_decay=adamw_weight_decay, ns_dtype=ns_dtype,
                     io_adamw=io_adamw, adamw_lr_scale=float(adamw_lr_scale), adamw_betas=(beta1, 0.999))
