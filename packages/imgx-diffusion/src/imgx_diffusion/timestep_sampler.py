"""Timestep samplers for training: uniform and loss-aware importance sampling.

Importance sampling follows Nichol & Dhariwal 2021 (§3.3): p_t ∝ √E[L_t²], estimated from a
history of losses per step, mixed with a little of the uniform distribution. A sample drawn
from p over the n = t_max − t_min steps of the range is weighted by 1/(n·p_t), so that
E_{t∼p}[w_t L_t] = (1/n) Σ_t L_t: the estimator of the uniform average stays unbiased.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

TIMESTEP_SAMPLERS = ("uniform", "importance")


class TimestepSamplerState(NamedTuple):
    """History per step (a pytree to keep in the train state and checkpoint).

    Attributes:
        loss_sq: exponential moving average of the squared loss per step, float32 (T,).
        count: number of losses seen per step, int32 (T,).
    """

    loss_sq: jax.Array
    count: jax.Array


@dataclasses.dataclass(frozen=True)
class TimestepSampler:
    """How training steps t are drawn.

    Attributes:
        method: ``uniform`` or ``importance``.
        warmup_count: importance sampling starts once every step of the range has been seen
            this many times; until then the under-seen steps are drawn uniformly (weight 1).
        history_decay: decay of the moving average of squared losses.
        uniform_fraction: share of the uniform distribution mixed into p_t.
    """

    method: str = "importance"
    warmup_count: int = 10
    history_decay: float = 0.9
    uniform_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.method not in TIMESTEP_SAMPLERS:
            raise ValueError(
                f"TimestepSampler.method: unknown {self.method!r}; "
                f"choose one of {TIMESTEP_SAMPLERS}."
            )
        if not 0.0 <= self.history_decay < 1.0 or not 0.0 < self.uniform_fraction <= 1.0:
            raise ValueError(
                "TimestepSampler: history_decay must be in [0, 1) and uniform_fraction in (0, 1]."
            )

    def init(self, num_timesteps: int) -> TimestepSamplerState:
        """Empty history for a process of T steps."""
        return TimestepSamplerState(
            loss_sq=jnp.zeros((num_timesteps,), jnp.float32),
            count=jnp.zeros((num_timesteps,), jnp.int32),
        )

    def probabilities(
        self, state: TimestepSamplerState, t_min: int, t_max: int
    ) -> tuple[jax.Array, jax.Array]:
        """Probabilities p_t over all T steps (zero outside [t_min, t_max)) and warm-up flag.

        Uniform: 1/n on the range. Importance, in warm-up (some step of the range seen fewer
        than warmup_count times): uniform over the under-seen steps. Importance afterwards:
        p_t = (1 − u)·√E[L_t²]/Σ√E[L²] + u/n with u = uniform_fraction.

        Returns:
            (p of shape (T,), summing to 1; in_warmup, a bool scalar).
        """
        num_timesteps = state.count.shape[0]
        if not 0 <= t_min < t_max <= num_timesteps:
            raise ValueError(
                f"TimestepSampler: need 0 ≤ t_min < t_max ≤ {num_timesteps}, "
                f"got [{t_min}, {t_max})."
            )
        steps = jnp.arange(num_timesteps)
        in_range = (steps >= t_min) & (steps < t_max)
        n = t_max - t_min
        uniform = in_range / n
        if self.method == "uniform":
            return uniform, jnp.asarray(False)
        under_seen = in_range & (state.count < self.warmup_count)
        in_warmup = jnp.any(under_seen)
        warmup_p = under_seen / jnp.maximum(jnp.sum(under_seen), 1)
        root = jnp.where(in_range, jnp.sqrt(state.loss_sq), 0.0)
        total = jnp.sum(root)
        # An all-zero history (zero losses) carries no preference: fall back to uniform.
        loss_p = jnp.where(total > 0, root / jnp.where(total > 0, total, 1.0), uniform)
        importance_p = (1.0 - self.uniform_fraction) * loss_p + self.uniform_fraction * uniform
        return jnp.where(in_warmup, warmup_p, importance_p), in_warmup

    def sample(
        self,
        key: chex.PRNGKey,
        state: TimestepSamplerState,
        batch_size: int,
        t_min: int,
        t_max: int,
    ) -> tuple[jax.Array, jax.Array]:
        """Draw t (batch,) int32 in [t_min, t_max) and the loss weights 1/(n·p_t) (batch,).

        Weights are 1 for the uniform sampler and during the importance warm-up.
        """
        p, in_warmup = self.probabilities(state, t_min, t_max)
        t = jax.random.choice(key, p.shape[0], shape=(batch_size,), p=p).astype(jnp.int32)
        weight = 1.0 / ((t_max - t_min) * p[t])
        weight = jnp.where(in_warmup, 1.0, weight).astype(jnp.float32)
        return t, weight

    def update(
        self, state: TimestepSamplerState, t: chex.Array, loss: chex.Array
    ) -> TimestepSamplerState:
        """Record the unweighted per-sample losses (batch,) observed at steps t (batch,).

        Pass the global batch (under jit with a data-parallel mesh the array is already
        global). Per step: E[L²] ← decay·E[L²] + (1 − decay)·mean of the new L², the first
        observation initialising the average; counts add the number of samples.
        """
        chex.assert_equal_shape([t, loss])
        loss = jax.lax.stop_gradient(loss).astype(jnp.float32)
        num_timesteps = state.count.shape[0]
        new_sum = jnp.zeros((num_timesteps,), jnp.float32).at[t].add(loss**2)
        new_count = jnp.zeros((num_timesteps,), jnp.int32).at[t].add(1)
        new_mean = new_sum / jnp.maximum(new_count, 1)
        decayed = self.history_decay * state.loss_sq + (1.0 - self.history_decay) * new_mean
        loss_sq = jnp.where(
            new_count > 0, jnp.where(state.count > 0, decayed, new_mean), state.loss_sq
        )
        return TimestepSamplerState(loss_sq=loss_sq, count=state.count + new_count)
