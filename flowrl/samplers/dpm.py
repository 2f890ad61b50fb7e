"""DPM-Solver++(2M) for the ODE steps of a flow chain after its SDE window (MixGRPO-Flash, Li et al.
2025, arXiv 2507.21802; its code: fastvideo/utils/sampling_utils.py, ``dpm_algorithm_type
dpmsolver++``, ``dpm_apply_strategy post``, ``dpm_solver_order 2``, ``dpm_solver_type midpoint``).

Rectified flow as a diffusion: x_s = alpha_s x_0 + sigma_s eps with alpha_s = 1 - s, sigma_s = s,
half log-SNR lambda_s = log(alpha_s / sigma_s); the data prediction is x0_hat = x - s v.

One step s -> s' (h = lambda_s' - lambda_s, so exp(-h) = alpha_s sigma_s' / (sigma_s alpha_s')),
with D0 = x0_hat at s and m1 = x0_hat at the previous step's level s_prev:

    first order  x' = (s' / s) x - alpha_s' (exp(-h) - 1) D0           (= the Euler step x + (s' - s) v)
    2M midpoint  r  = (lambda_s - lambda_s_prev) / h,  D1 = (D0 - m1) / r
                 x' = (s' / s) x - alpha_s' (exp(-h) - 1) (D0 + D1 / 2)

As the reference: the first step after the window already uses the window's last x0_hat (its
DPMState is updated at every step up to the window's end); the chain's last step (s' = 0) is first
order (lower_order_final), landing on x0_hat; a previous level s_prev = 1 (lambda = -inf) gives
D1 = 0. Steps before the window stay Euler steps.

Compressed schedule (``dpm_post_compress_ratio``, ``ode_compress`` here): after the window's last
step L the remaining K - L levels are replaced by n = max(int((K - L) ratio), 2) levels
warp(linspace(t_{L+1}, 0, n)), t_{L+1} the unshifted time of sigmas[L+1] and warp the scheduler's
shift (the reference: sd3_time_shift(shift, linspace(t_{L+1}, 0, n)) with its static shift; its
max(., 1) would leave a chain that never reaches s = 0 once n is 1, flowrl keeps one step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ODE_SOLVERS = ("euler", "dpmpp2m")


def _lam(s: float) -> float:
    """lambda_s = log((1 - s) / s), -inf at s = 1, +inf at s = 0."""
    if s >= 1:
        return -math.inf
    if s <= 0:
        return math.inf
    return math.log((1 - s) / s)


def dpmpp_2m_step(
    x: Tensor, x0: Tensor, s: float, s_next: float, x0_prev: Tensor | None = None, s_prev: float | None = None
) -> Tensor:
    """x' from x at level s to s' with D0 = ``x0`` (x - s v); 2M midpoint when the previous step's
    x0_hat ``x0_prev`` at ``s_prev`` is given and s' > 0, first order otherwise. Float32 in, float32 out
    (the coefficients are computed in float64)."""
    a_next = 1.0 - s_next
    # exp(-h) - 1 without logs, finite at s = 1 (alpha_s = 0) and s' = 0
    phi = (1.0 - s) * s_next / (s * a_next) - 1.0 if a_next > 0 else -1.0
    d = x0.float()
    if x0_prev is not None and s_prev is not None and s_next > 0:
        h, h0 = _lam(s_next) - _lam(s), _lam(s) - _lam(s_prev)
        if math.isfinite(h0):  # s_prev = 1: lambda = -inf, r = inf, D1 = 0
            d = d + 0.5 * (h / h0) * (x0.float() - x0_prev.float())
    return (s_next / s) * x.float() - (a_next * phi) * d


def unwarp(warp, sigma: float, iters: int = 80) -> float:
    """The unshifted time t in [0, 1] with warp(t) = sigma (bisection; warp increasing)."""
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(warp(torch.tensor([mid], dtype=torch.float64))[0]) < sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def compressed_sigmas(sigmas: Tensor, last: int, ratio: float, warp) -> Tensor:
    """(L + 1 + n,) the chain's levels with the n levels after window step ``last`` = L compressed
    (module docstring). ``sigmas`` (K + 1,) the full schedule; ``warp`` maps unshifted t to s."""
    K = len(sigmas) - 1
    n = max(int((K - last) * ratio), 2)
    t0 = unwarp(warp, float(sigmas[last + 1]))
    post = warp(torch.linspace(t0, 0.0, n, dtype=torch.float64)).float()
    post[0], post[-1] = sigmas[last + 1], 0.0  # exactly the window's landing level, and 0
    return torch.cat([sigmas[: last + 1].float(), post])
