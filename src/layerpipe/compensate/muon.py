"""(f) `muon`: torch.optim.Muon for the matrices, AdamW for the rest, as one optimizer.

Muon orthogonalises a Nesterov-momentum update of every 2-D weight (Newton-Schulz), so each
step has a fixed spectral size whatever the gradient's scale; Zmushko et al. (2026) found it,
with high momentum, far more robust to delayed gradients than AdamW. 1-D tensors (biases,
LayerNorm) go to AdamW. `adjust_lr_fn="match_rms_adamw"` lets both share one lr. With
`per_delay=True` Muon's momentum follows the delay rule of `nesterov`
(`delay_beta1(momentum, d_k, momentum_max)`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.compensate.nesterov import delay_beta1
from layerpipe.compensate.registry import register
from layerpipe.errors import LayerpipeError


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
    ) -> None:
        muon_cls = getattr(torch.optim, "Muon", None)
        if muon_cls is None:
            raise LayerpipeError(f"the muon optimizer needs torch.optim.Muon (torch >= 2.9); this torch is {torch.__version__}")
        params = list(params)
        matrices = [p for p in params if p.ndim == 2]
        rest = [p for p in params if p.ndim != 2]
        self.muon = (
            muon_cls(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True, adjust_lr_fn=adjust_lr_fn)
            if matrices
            else None
        )
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=adamw_betas, weight_decay=adamw_weight_decay) if rest else None

    def _parts(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self._parts() for g in o.param_groups]

    @property
    def state(self) -> dict[Tensor, Any]:
        return {p: s for o in self._parts() for p, s in o.state.items()}

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for o in self._parts():
            o.step()

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
    adamw_weight_decay: float = 0.01,
) -> MuonAdamW:
    mom = delay_beta1(momentum, delay, momentum_max) if per_delay else momentum
    return MuonAdamW(params, lr, weight_decay=weight_decay, momentum=mom, adamw_weight_decay=adamw_weight_decay)
