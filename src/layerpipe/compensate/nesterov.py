"""(a) `nesterov`: AdamW with a Nesterov look-ahead and a high, per-stage beta1 set by the delay.

A stale gradient is a gradient of where the weights were; a heavier, look-ahead momentum
averages over more steps, so the delay is a smaller fraction of the averaging window
(Ajanthan et al., ICML 2025: Nesterov look-ahead with beta1 0.99 made 8-stage asynchronous
training match synchronous). The per-stage rule keeps the window about d_k + 1 times the
base one:

    beta1_k = min(beta1_max, 1 - (1 - beta1) / (1 + d_k))      (per_delay=True)

The update (NAdam without its momentum-decay schedule, weight decay decoupled), t = step:

    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    m_hat = b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t) ;  v_hat = v / (1 - b2^t)
    p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from layerpipe.compensate.registry import register


def delay_beta1(beta1: float, delay: int, beta1_max: float) -> float:
    """The per-stage beta1: the base one at d = 0, a window d + 1 times longer otherwise."""
    return min(beta1_max, 1.0 - (1.0 - beta1) / (1.0 + delay))


class NesterovAdamW(torch.optim.Optimizer):
    """AdamW with Nesterov momentum (Dozat's NAdam, constant beta1, decoupled weight decay)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                m, v = st["m"], st["v"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = m.mul(b1 / (1 - b1 ** (t + 1))).add_(g, alpha=(1 - b1) / (1 - b1**t))
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                p.mul_(1 - lr * wd).addcdiv_(m_hat, denom, value=-lr)
        return None


@register("nesterov", builds_optimizer=True)
def build_nesterov(
    params: Sequence[Tensor],
    delay: int,
    *,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta1_max: float = 0.99,
    beta2: float = 0.999,
    weight_decay: float = 0.01,
    eps: float = 1e-8,
    per_delay: bool = True,
) -> NesterovAdamW:
    b1 = delay_beta1(beta1, delay, beta1_max) if per_delay else beta1
    return NesterovAdamW(params, lr=lr, betas=(b1, beta2), eps=eps, weight_decay=weight_decay)
