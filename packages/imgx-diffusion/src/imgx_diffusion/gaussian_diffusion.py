"""Gaussian diffusion (Ho et al. 2020) on a respaced beta schedule.

Notation (per step t of the process, after respacing): α_t = 1 − β_t, ᾱ_t = Π_{s≤t} α_s,
ᾱ_prev_t = ᾱ_{t−1} with ᾱ_{−1} = 1. Index t = 0 is the least noisy level.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from imgx_diffusion.schedules import respacing_indices

MODEL_OUTPUTS = ("x0", "epsilon", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _xp(array: Any) -> Any:
    """numpy for concrete numpy leaves (float64 precision), jax.numpy under tracing."""
    return np if isinstance(array, np.ndarray) else jnp


def compute_dtype(dtype: Any) -> Any:
    """At least float32: diffusion arithmetic is never done in bfloat16/float16, where
    1 − ᾱ_t near t = 0 (about 1e-4) would round to zero."""
    return jnp.promote_types(dtype, jnp.float32)


def _extract(coefficients: Any, t: chex.Array, x: chex.Array) -> jax.Array:
    """Gather per-step coefficients at t (batch,), at least float32, shaped to broadcast with x."""
    values = jnp.asarray(coefficients, dtype=compute_dtype(x.dtype))[t]
    return values.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def normal_kl(mean1: chex.Array, log_var1: chex.Array, mean2: chex.Array, log_var2: chex.Array):
    """KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)) in nats, elementwise."""
    return 0.5 * (
        -1.0
        + log_var2
        - log_var1
        + jnp.exp(log_var1 - log_var2)
        + jnp.square(mean1 - mean2) * jnp.exp(-log_var2)
    )


@dataclasses.dataclass(frozen=True)
class GaussianDiffusion:
    """A Gaussian diffusion process; a pytree (arrays are leaves) usable inside jit.

    Attributes:
        betas: β of each step, shape (T,). float64 numpy outside jit.
        alphas_cumprod: ᾱ_t = Π_{s≤t} (1 − β_s), shape (T,); kept alongside β so that both
            are rounded once, not accumulated, when the process is a float32 jit argument.
        timestep_map: index j in the base schedule of each step, int shape (T,).
        num_base_timesteps: N, length of the base schedule (the network time is (j + 1)/N).
        model_output: parameterisation of the network output, ``x0``, ``epsilon`` or ``v``.
        variance: reverse-process variance, ``fixed_small``, ``fixed_large`` or
            ``learned_range``.
    """

    betas: Any
    alphas_cumprod: Any
    timestep_map: Any
    num_base_timesteps: int
    model_output: str = "x0"
    variance: str = "fixed_small"

    def __post_init__(self) -> None:
        if self.model_output not in MODEL_OUTPUTS:
            raise ValueError(
                f"GaussianDiffusion.model_output: unknown {self.model_output!r}; "
                f"choose one of {MODEL_OUTPUTS}."
            )
        if self.variance not in VARIANCES:
            raise ValueError(
                f"GaussianDiffusion.variance: unknown {self.variance!r}; choose one of {VARIANCES}."
            )

    @classmethod
    def from_betas(
        cls, betas: Any, model_output: str = "x0", variance: str = "fixed_small"
    ) -> GaussianDiffusion:
        """Build the base process (timestep_map = 0 … N−1) from betas of shape (N,)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(
                f"GaussianDiffusion.from_betas: betas must be 1-D with ≥ 2 values, "
                f"got shape {betas.shape}."
            )
        if not (np.all(betas > 0) and np.all(betas < 1)):
            raise ValueError("GaussianDiffusion.from_betas: every beta must lie in (0, 1).")
        n = betas.shape[0]
        return cls(
            betas, np.cumprod(1.0 - betas), np.arange(n, dtype=np.int64), n, model_output, variance
        )

    # ------------------------------------------------------------------ schedule quantities
    @property
    def num_timesteps(self) -> int:
        """T, the number of steps of this (possibly respaced) process."""
        return self.betas.shape[0]

    @property
    def alphas(self):
        """α_t = 1 − β_t, shape (T,)."""
        return 1.0 - self.betas

    @property
    def alphas_cumprod_prev(self):
        """ᾱ_{t−1} with ᾱ_{−1} = 1, shape (T,)."""
        xp = _xp(self.betas)
        return xp.concatenate([xp.ones((1,), dtype=self.betas.dtype), self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self):
        """σ̃²_t = β_t (1 − ᾱ_prev_t)/(1 − ᾱ_t) (Ho et al. 2020, eq. 7); zero at t = 0."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self):
        """log σ̃²_t with the t = 0 value (log 0) replaced by log σ̃²_1."""
        xp = _xp(self.betas)
        var = self.posterior_variance
        return xp.log(xp.concatenate([var[1:2], var[1:]]))

    @property
    def posterior_mean_coef_x0(self):
        """β_t √ᾱ_prev_t/(1 − ᾱ_t), the x_0 coefficient of the posterior mean."""
        xp = _xp(self.betas)
        return self.betas * xp.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef_xt(self):
        """√α_t (1 − ᾱ_prev_t)/(1 − ᾱ_t), the x_t coefficient of the posterior mean."""
        xp = _xp(self.betas)
        return xp.sqrt(self.alphas) * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def fixed_log_variance(self):
        """Log variance of p(x_{t−1}|x_t) for the fixed variance types, shape (T,).

        ``fixed_small``: log σ̃²_t (clipped at t = 0); ``fixed_large``: log β_t with σ̃²_1 at
        t = 0 (Ho et al. 2020 §3.2). Undefined for ``learned_range``.
        """
        xp = _xp(self.betas)
        if self.variance == "fixed_small":
            return self.posterior_log_variance_clipped
        if self.variance == "fixed_large":
            return xp.log(xp.concatenate([self.posterior_variance[1:2], self.betas[1:]]))
        raise ValueError("fixed_log_variance: the variance is learned (learned_range).")

    # ------------------------------------------------------------------ time
    def respace(self, num_steps: int) -> GaussianDiffusion:
        """Respace to K steps keeping ᾱ at evenly spaced indices (both ends kept).

        β_k = 1 − ᾱ_k/ᾱ_{k−1} with β_0 = 1 − ᾱ_0 (Nichol & Dhariwal 2021, App. B);
        timestep_map composes, so it always refers to the base schedule. Call outside jit.
        """
        indices = respacing_indices(self.num_timesteps, num_steps)
        alphas_cumprod = np.asarray(self.alphas_cumprod, dtype=np.float64)[indices]
        betas = 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
        timestep_map = np.asarray(self.timestep_map, dtype=np.int64)[indices]
        return dataclasses.replace(
            self, betas=betas, alphas_cumprod=alphas_cumprod, timestep_map=timestep_map
        )

    def model_time(self, t: chex.Array) -> jax.Array:
        """Network time of step index t: (timestep_map[t] + 1)/N, float32 in (0, 1].

        Always relative to the base schedule, so that training with T steps and sampling with
        K steps feed the network the same values at the same noise levels.
        """
        j = jnp.asarray(self.timestep_map)[t]
        return (j.astype(jnp.float32) + 1.0) / self.num_base_timesteps

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: chex.Array, t: chex.Array):
        """Mean √ᾱ_t x_0, variance 1 − ᾱ_t and its log of q(x_t | x_0)."""
        mean = _extract(_xp(self.betas).sqrt(self.alphas_cumprod), t, x0) * x0
        var = jnp.broadcast_to(_extract(1.0 - self.alphas_cumprod, t, x0), x0.shape)
        return mean, var, jnp.log(var)

    def q_sample(self, x0: chex.Array, noise: chex.Array, t: chex.Array) -> jax.Array:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, x0 and noise (batch, ...), t int (batch,)."""
        chex.assert_equal_shape([x0, noise])
        xp = _xp(self.betas)
        return (
            _extract(xp.sqrt(self.alphas_cumprod), t, x0) * x0
            + _extract(xp.sqrt(1.0 - self.alphas_cumprod), t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: chex.Array, xt: chex.Array, t: chex.Array):
        """Mean, variance and clipped log variance of q(x_{t−1} | x_t, x_0) (Ho et al. eq. 7).

        mean = β_t √ᾱ_prev/(1−ᾱ_t) · x_0 + √α_t (1−ᾱ_prev)/(1−ᾱ_t) · x_t,
        variance σ̃²_t = β_t (1−ᾱ_prev)/(1−ᾱ_t); all broadcast to the shape of x_t.
        """
        chex.assert_equal_shape([x0, xt])
        mean = (
            _extract(self.posterior_mean_coef_x0, t, xt) * x0
            + _extract(self.posterior_mean_coef_xt, t, xt) * xt
        )
        var = jnp.broadcast_to(_extract(self.posterior_variance, t, xt), xt.shape)
        log_var = jnp.broadcast_to(_extract(self.posterior_log_variance_clipped, t, xt), xt.shape)
        return mean, var, log_var

    # ------------------------------------------------------------------ conversions
    def predict_x0_from_epsilon(self, xt: chex.Array, eps: chex.Array, t: chex.Array):
        """x_0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t."""
        xp = _xp(self.betas)
        return (xt - _extract(xp.sqrt(1.0 - self.alphas_cumprod), t, xt) * eps) / _extract(
            xp.sqrt(self.alphas_cumprod), t, xt
        )

    def predict_epsilon_from_x0(self, xt: chex.Array, x0: chex.Array, t: chex.Array):
        """ε = (x_t − √ᾱ_t x_0)/√(1 − ᾱ_t)."""
        xp = _xp(self.betas)
        return (xt - _extract(xp.sqrt(self.alphas_cumprod), t, xt) * x0) / _extract(
            xp.sqrt(1.0 - self.alphas_cumprod), t, xt
        )

    def predict_v(self, x0: chex.Array, eps: chex.Array, t: chex.Array):
        """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022)."""
        xp = _xp(self.betas)
        return (
            _extract(xp.sqrt(self.alphas_cumprod), t, x0) * eps
            - _extract(xp.sqrt(1.0 - self.alphas_cumprod), t, x0) * x0
        )

    def predict_x0_from_v(self, xt: chex.Array, v: chex.Array, t: chex.Array):
        """x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
        xp = _xp(self.betas)
        return (
            _extract(xp.sqrt(self.alphas_cumprod), t, xt) * xt
            - _extract(xp.sqrt(1.0 - self.alphas_cumprod), t, xt) * v
        )

    def predict_epsilon_from_v(self, xt: chex.Array, v: chex.Array, t: chex.Array):
        """ε = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
        xp = _xp(self.betas)
        return (
            _extract(xp.sqrt(1.0 - self.alphas_cumprod), t, xt) * xt
            + _extract(xp.sqrt(self.alphas_cumprod), t, xt) * v
        )

    def training_target(self, x0: chex.Array, xt: chex.Array, t: chex.Array) -> jax.Array:
        """Target of the configured parameterisation for x_t built from the true x_0.

        ``x0`` → x_0, ``epsilon`` → ε = (x_t − √ᾱ x_0)/√(1−ᾱ), ``v`` → √ᾱ ε − √(1−ᾱ) x_0.
        Defined from (x_t, x_0) rather than the noise drawn, so that it stays the target of
        "recover the ground truth" when x_t was built from a recycled estimate.
        """
        if self.model_output == "x0":
            return x0
        eps = self.predict_epsilon_from_x0(xt, x0, t)
        if self.model_output == "epsilon":
            return eps
        return self.predict_v(x0, eps, t)

    def learned_log_variance(self, u: chex.Array, t: chex.Array) -> jax.Array:
        """Log variance of ``learned_range`` from the extra model output u ∈ [−1, 1].

        frac = (u + 1)/2, log σ² = frac · log β_t + (1 − frac) · log σ̃²_t (clipped)
        (Nichol & Dhariwal 2021, eq. 15).
        """
        xp = _xp(self.betas)
        frac = (u + 1.0) / 2.0
        return frac * _extract(xp.log(self.betas), t, u) + (1.0 - frac) * _extract(
            self.posterior_log_variance_clipped, t, u
        )

    # ------------------------------------------------------------------ reverse steps
    def p_log_variance(self, t: chex.Array, x: chex.Array, log_variance=None) -> jax.Array:
        """Log variance of p(x_{t−1} | x_t): the learned one if given, else the fixed one."""
        if log_variance is not None:
            return jnp.broadcast_to(log_variance, x.shape)
        if self.variance == "learned_range":
            raise ValueError(
                "learned_range: pass the model's log_variance (see learned_log_variance)."
            )
        return jnp.broadcast_to(_extract(self.fixed_log_variance, t, x), x.shape)

    def ddpm_step(
        self,
        key: chex.PRNGKey,
        x0_pred: chex.Array,
        xt: chex.Array,
        t: chex.Array,
        log_variance: chex.Array | None = None,
    ) -> jax.Array:
        """Ancestral step x_{t−1} = posterior mean(x̂_0, x_t) + σ_t z, no noise at t = 0."""
        mean, _, _ = self.q_posterior_mean_variance(x0_pred, xt, t)
        log_var = self.p_log_variance(t, xt, log_variance)
        noise = jax.random.normal(key, xt.shape, xt.dtype)
        nonzero = (t > 0).astype(xt.dtype).reshape(t.shape + (1,) * (xt.ndim - 1))
        return mean + nonzero * jnp.exp(0.5 * log_var) * noise

    def ddim_sigma(self, t: chex.Array, x: chex.Array, eta: float) -> jax.Array:
        """σ_t = eta √((1 − ᾱ_prev)/(1 − ᾱ) · (1 − ᾱ/ᾱ_prev)) (Song et al. 2021, eq. 16).

        Since ᾱ/ᾱ_prev = α_t this is eta·σ̃_t, computed from σ̃²_t to avoid cancellation.
        """
        return eta * _extract(_xp(self.betas).sqrt(self.posterior_variance), t, x)

    def ddim_step(
        self,
        key: chex.PRNGKey | None,
        x0_pred: chex.Array,
        xt: chex.Array,
        t: chex.Array,
        eta: float | chex.Array = 0.0,
    ) -> jax.Array:
        """DDIM step (Song et al. 2021, eq. 12).

        x_{t−1} = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ_t²) ε̂ + σ_t z with ε̂ from (x_t, x̂_0); with
        eta = 0 deterministic, eta = 1 has the DDPM posterior variance. ``eta`` may be a
        Python number or a (traced) scalar array; key may be None only for a Python eta = 0.
        """
        eps = self.predict_epsilon_from_x0(xt, x0_pred, t)
        a_prev = _extract(self.alphas_cumprod_prev, t, xt)
        x_prev = jnp.sqrt(a_prev) * x0_pred
        if isinstance(eta, (int, float, np.integer, np.floating)) and eta == 0.0:
            return x_prev + jnp.sqrt(1.0 - a_prev) * eps
        if key is None:
            raise ValueError(
                "ddim_step: eta > 0 (or an array eta, whose value is unknown under jit) "
                "needs a PRNG key; pass key, or eta=0.0 as a Python float for the "
                "deterministic step."
            )
        sigma = self.ddim_sigma(t, xt, eta)
        noise = jax.random.normal(key, xt.shape, xt.dtype)
        return x_prev + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps + sigma * noise

    def dpm_solver_2m_step(
        self,
        x0_pred: chex.Array,
        xt: chex.Array,
        t: chex.Array,
        x0_pred_previous: chex.Array | None = None,
    ) -> jax.Array:
        """DPM-Solver++(2M) step from t to t − 1 (Lu et al. 2022, Algorithm 2).

        With α = √ᾱ, σ = √(1 − ᾱ), λ = log(α/σ) and h = λ_{t−1} − λ_t:
        x_{t−1} = (σ_{t−1}/σ_t) x_t + α_{t−1} (1 − e^{−h}) D, where D = x̂_0 (first order, equal
        to DDIM with eta = 0) or, given the previous prediction x̂_0' made at t + 1,
        D = (1 + 1/(2r)) x̂_0 − 1/(2r) x̂_0' with r = (λ_t − λ_{t+1})/h. At t = 0 the step is
        first order and returns x̂_0.
        """
        xp = _xp(self.betas)
        a = self.alphas_cumprod
        a_prev = self.alphas_cumprod_prev
        sigma_ratio = _extract(xp.sqrt((1.0 - a_prev) / (1.0 - a)), t, xt)
        alpha_prev = _extract(xp.sqrt(a_prev), t, xt)
        # e^{−h} = (σ_{t−1} α_t)/(σ_t α_{t−1}), finite even at t = 0 where σ_{t−1} = 0.
        exp_neg_h = sigma_ratio * _extract(xp.sqrt(a), t, xt) / alpha_prev
        d = x0_pred
        if x0_pred_previous is not None:
            log_snr = 0.5 * (xp.log(a) - xp.log(1.0 - a))  # λ_t, shape (T,)
            t_next = jnp.minimum(t + 1, self.num_timesteps - 1)
            t_prev = jnp.maximum(t - 1, 0)
            h = _extract(log_snr, t_prev, xt) - _extract(log_snr, t, xt)
            h_last = _extract(log_snr, t, xt) - _extract(log_snr, t_next, xt)
            second_order = (t > 0) & (t < self.num_timesteps - 1)
            second_order = second_order.reshape(t.shape + (1,) * (xt.ndim - 1))
            inv_2r = jnp.where(second_order, h / (2.0 * h_last), 0.0)
            d = (1.0 + inv_2r) * x0_pred - inv_2r * x0_pred_previous
        return sigma_ratio * xt + alpha_prev * (1.0 - exp_neg_h) * d

    # ------------------------------------------------------------------ variational bound
    def variational_bound(
        self,
        x0: chex.Array,
        xt: chex.Array,
        t: chex.Array,
        x0_pred: chex.Array,
        log_variance: chex.Array | None = None,
    ) -> jax.Array:
        """Per-sample term L_t of the variational bound, in bits per dimension, shape (batch,).

        t > 0: KL(q(x_{t−1}|x_t, x_0) ‖ p(x_{t−1}|x_t)); t = 0: the decoder term for masks
        of values ±1, −log P(sign(x) = x_0) = −log Φ(x_0 μ/σ) for x ~ N(μ, σ²). The model mean
        μ is stop-gradiented, so only the (learned) variance is trained by this term
        (Nichol & Dhariwal 2021, §3.1).
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        model_mean, _, _ = self.q_posterior_mean_variance(jax.lax.stop_gradient(x0_pred), xt, t)
        model_mean = jax.lax.stop_gradient(model_mean)
        model_log_var = self.p_log_variance(t, xt, log_variance)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var)
        decoder_nll = -jax.scipy.special.log_ndtr(x0 * model_mean * jnp.exp(-0.5 * model_log_var))
        axes = tuple(range(1, xt.ndim))
        per_sample = jnp.where(t == 0, decoder_nll.mean(axis=axes), kl.mean(axis=axes))
        return per_sample / math.log(2.0)


jax.tree_util.register_dataclass(
    GaussianDiffusion,
    data_fields=["betas", "alphas_cumprod", "timestep_map"],
    meta_fields=["num_base_timesteps", "model_output", "variance"],
)
