"""Optimizer: AdamW with warm-up + cosine decay, global-norm clipping, non-finite skipping."""

from __future__ import annotations

import optax

from imgx_train.config import OptimizerConfig

# Non-finite gradients never reach the parameters: the update is skipped however many
# times in a row it happens (optax gives up after `max_consecutive_errors`).
_NEVER_GIVE_UP = 2**30


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up from `init_lr` to `peak_lr`, then cosine decay to `end_lr`.

    lr(s) = init + (peak − init)·s/W for s < W; afterwards
    lr(s) = end + (peak − end)·½(1 + cos(π·min(s − W, D)/D)) with W warm-up, D decay steps.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.init_lr,
        peak_value=cfg.peak_lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.warmup_steps + cfg.decay_steps,
        end_value=cfg.end_lr,
    )


def optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm → AdamW, skipped as a whole when a gradient is not finite.

    The optimizer state's `total_notfinite` counts the skipped updates.
    """
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate=learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=cfg.weight_decay,
        ),
    )
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_GIVE_UP)
