"""Beta schedules of the forward process and respacing indices.

Every diffusion process in imgx is a respacing of one base schedule of N steps
(default N = 1001, linear from 1e-4 to 0.02 as in Ho et al. 2020).
"""

from __future__ import annotations

import numpy as np

BETA_SCHEDULES = ("linear", "quadratic", "cosine")


def beta_schedule(
    name: str,
    num_timesteps: int = 1001,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_offset: float = 0.008,
    max_beta: float = 0.999,
) -> np.ndarray:
    """Return the betas of a base schedule, float64 of shape (num_timesteps,).

    - ``linear`` (Ho et al. 2020): N values evenly spaced from beta_start to beta_end.
    - ``quadratic`` (a.k.a. scaled linear): the squares of N values evenly spaced between
      √beta_start and √beta_end.
    - ``cosine`` (Nichol & Dhariwal 2021, eq. 17): ᾱ(s) = f(s)/f(0) with
      f(s) = cos(((s/N) + o)/(1 + o) · π/2)², o = cosine_offset, and
      β_i = min(1 − ᾱ(i+1)/ᾱ(i), max_beta). beta_start/beta_end are unused.

    Args:
        name: one of ``linear``, ``quadratic``, ``cosine``.
        num_timesteps: N, number of steps (≥ 2).
        beta_start: first beta of linear/quadratic schedules.
        beta_end: last beta of linear/quadratic schedules.
        cosine_offset: offset o of the cosine schedule.
        max_beta: clip of the cosine betas near the end.

    Returns:
        betas, float64 array of shape (num_timesteps,), each in (0, 1).
    """
    if num_timesteps < 2:
        raise ValueError(f"beta_schedule: num_timesteps must be ≥ 2, got {num_timesteps}.")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    elif name == "quadratic":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    elif name == "cosine":
        s = np.arange(num_timesteps + 1, dtype=np.float64)
        f = np.cos(((s / num_timesteps) + cosine_offset) / (1 + cosine_offset) * np.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = np.minimum(1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1], max_beta)
    else:
        raise ValueError(
            f"beta_schedule: unknown schedule {name!r}; choose one of {BETA_SCHEDULES}."
        )
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(
            f"beta_schedule: betas of {name!r} must lie in (0, 1); check beta_start={beta_start} "
            f"and beta_end={beta_end}."
        )
    return betas


def respacing_indices(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Indices kept when respacing a process of T steps to K steps.

    Evenly spaced with both ends kept. When (T − 1) is divisible by (K − 1) this is every
    (T − 1)/(K − 1)-th index exactly (e.g. T = 1001, K = 5 → 0, 250, 500, 750, 1000);
    otherwise the evenly spaced positions are rounded to the nearest index.

    Args:
        num_timesteps: T, steps of the process being respaced.
        num_steps: K, with 2 ≤ K ≤ T.

    Returns:
        int64 array of shape (K,), strictly increasing, first 0 and last T − 1.
    """
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(
            f"respacing: the number of steps must be in [2, {num_timesteps}] for a process of "
            f"{num_timesteps} steps, got {num_steps}."
        )
    return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
