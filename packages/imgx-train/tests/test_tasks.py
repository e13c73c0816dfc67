"""Diffusion tasks: every strategy, parameterisation and variance through the train step;
the ε-MSE of the DGM4MICCAI preset in closed form; the importance sampler's L_t.

The network is the smallest U-Net (one level of 4 channels, no transformer) on 16×16
images with a batch of 2, so each train step compiles in a few seconds. The cases combine
the options so that every value of each is run once with three compiles.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import imgx_data
import imgx_diffusion as idf
from imgx_train import optim, presets, tasks, trainer

TINY = (
    "model.num_channels=[4],model.num_res_blocks=1,model.num_transformer_layers=0,"
    "model.num_heads=1,data.augmentation=false,logging.wandb=disabled"
)
SIZE = 16


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    # Not built: the registry's description of the phantom (3 classes, 1 channel, 2D).
    phantom = imgx_data.dataset_info("phantom", data_dir=tmp_path_factory.mktemp("data"))
    return dataclasses.replace(phantom, image_shape=(SIZE, SIZE))


def _config(extra="", preset="debug"):
    return presets.make_config("phantom", preset=preset, overrides=f"{TINY},{extra}")


def _batch(num_channels):
    label = np.zeros((2, SIZE, SIZE), np.int32)
    label[:, 3:9, 4:12] = 1
    label[1, 10:14, 2:6] = 2
    image = jax.random.uniform(jax.random.key(0), (2, SIZE, SIZE, num_channels))
    return {"image": image, "label": jnp.asarray(label), "spacing": jnp.ones((2, 2))}


# (id, overrides, checks): together every strategy not trained elsewhere, every
# parameterisation, learned_range with its VLB, the uniform sampler and T = 1001.
CASES = [
    (
        "standard-epsilon-uniform",
        "diffusion.strategy=standard,diffusion.model_output=epsilon,"
        "diffusion.timestep_sampler=uniform,loss.mse=1",
        ("mse",),
    ),
    (
        "recycle_next-v-learned_range",
        "diffusion.strategy=recycle_next,diffusion.model_output=v,"
        "diffusion.variance=learned_range,loss.vlb=1,loss.mse=0.1,loss.mse_target=epsilon",
        ("mse", "vlb"),
    ),
    (
        "self_cond_same-x0-T1001",
        "diffusion.strategy=self_cond_same,diffusion.num_train_steps=1001",
        (),
    ),
]


@pytest.mark.parametrize(("overrides", "terms"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_train_step_runs_every_option(info, overrides, terms):
    """Two updates of the trainer's jitted step: finite losses, parameters that moved,
    every sample recorded by the timestep sampler at a step of the strategy's range."""
    cfg = _config(overrides)
    task = tasks.Task(cfg, info)
    tx = optim.optimizer(cfg.optimizer)
    initial = trainer.init_state(cfg, task, tx)
    step = jax.jit(trainer.make_train_step(cfg, task, tx, 1))
    batch = _batch(info.num_channels)
    state, first = step(initial, batch)
    state, second = step(state, batch)

    for metrics in (first, second):
        assert np.isfinite(float(metrics["loss"]))
        assert int(metrics["skipped"]) == 0
        for term in terms:
            assert np.isfinite(float(metrics[term]))
    assert int(state["step"]) == 2
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(initial["params"]), jax.tree.leaves(state["params"]), strict=True
        )
    ]
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state["params"]))
    assert sum(moved) > len(moved) // 2
    num_timesteps = cfg.diffusion.num_train_steps
    assert task.diffusion.num_timesteps == num_timesteps
    count = np.asarray(state["aux"].count)
    assert count.sum() == 4  # 2 updates × 2 samples
    if cfg.diffusion.strategy not in ("standard", "self_cond_same"):
        # Two-pass: t < T − 1 (the range itself on many draws: imgx-diffusion's
        # test_t_range_of_each_strategy).
        assert count[num_timesteps - 1] == 0
    assert np.all(np.asarray(state["aux"].loss_sq)[count > 0] > 0)

    if num_timesteps == 1001:
        # Trained on every step of the base schedule: K = 5 samples at 0, 250, ..., 1000.
        task.check_sampling("ddpm", 5)
        task.check_sampling("ddim", 5)
        sampling = idf.sampling_diffusion(task.diffusion, 5)
        np.testing.assert_array_equal(np.asarray(sampling.timestep_map), [0, 250, 500, 750, 1000])


def _alphas_cumprod(num_train_steps=5):
    """ᾱ of the linear 1e-4 → 0.02 schedule over 1001 steps at the respaced indices."""
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1001))
    return alphas_cumprod[np.round(np.linspace(0, 1000, num_train_steps)).astype(int)]


def _strategy_output(num_classes):
    """A hand-made strategy output of 2 samples at steps 1 and 3 of T = 5."""
    keys = jax.random.split(jax.random.key(1), 3)
    label = jax.random.randint(keys[0], (2, 4, 4), 0, num_classes)
    x0 = idf.x_from_mask(jax.nn.one_hot(label, num_classes))
    return idf.StrategyOutput(
        logits=jax.random.normal(keys[1], (2, 4, 4, num_classes)),
        x0=x0,
        xt=jax.random.normal(keys[2], x0.shape),
        t=jnp.asarray([1, 3], jnp.int32),
        weight=jnp.ones(2),
        mse=jnp.asarray([0.3, 0.7]),
        vlb=None,
        first_pass_logits=None,
    )


def test_mse_on_epsilon_of_an_x0_model(info):
    """x0 output: ε̂ − ε = −√(ᾱ/(1 − ᾱ))·(x̂_0 − x_0), so the term is ᾱ/(1 − ᾱ)·MSE(x̂_0)
    (≈ 1e4 at t = 0: why the dgm4miccai2023 preset puts no MSE on its x_0 model)."""
    cfg = _config("loss.mse=0.1,loss.mse_target=epsilon")
    assert cfg.diffusion.model_output == "x0"
    task = tasks.Task(cfg, info)
    out = _strategy_output(task.num_channels)
    x0_pred = 2.0 * np.asarray(jax.nn.softmax(out.logits, axis=-1)) - 1.0
    sq = np.square(x0_pred - np.asarray(out.x0)).reshape(2, -1).mean(axis=1)
    a = _alphas_cumprod()[[1, 3]]
    np.testing.assert_allclose(np.asarray(task.mse_loss(out)), a / (1 - a) * sq, rtol=1e-5)
    # The x_0-space MSE the strategy reports is not what mse_target=epsilon asks for.
    assert not np.allclose(a / (1 - a) * sq, sq, rtol=0.1)


def _constant_model(value):
    """A network whose output is `value` (C channels) everywhere."""

    def model_fn(image, mask_input, t, key):
        return jnp.broadcast_to(value, image.shape[:-1] + value.shape)

    return model_fn


@pytest.mark.parametrize(
    "overrides",
    [
        "diffusion.model_output=x0",  # mse_target=output: mean (x̂_0 − x_0)²
        "diffusion.model_output=epsilon,loss.mse_target=epsilon",  # mean (ε̂ − ε)², ε̂ = 0
        "diffusion.model_output=v,loss.mse_target=epsilon",  # ε̂ = √(1 − ᾱ) x_t for v̂ = 0
    ],
)
def test_mse_target_of_each_parameterisation(info, overrides):
    """Task.mse_loss on a real strategy step of a constant network, against closed forms
    in x_t, x_0 and ᾱ_t of the linear schedule."""
    task = tasks.Task(_config(f"loss.mse=1,diffusion.strategy=standard,{overrides}"), info)
    output = task.cfg.diffusion.model_output
    logits = jnp.asarray([0.3, -1.0, 2.0])
    batch = _batch(info.num_channels)
    out = idf.apply_strategy(
        "standard",
        task.diffusion,
        _constant_model(logits if output == "x0" else jnp.zeros(3)),
        jax.random.key(4),
        batch["image"],
        batch["label"],
        task.init_aux(),
        num_classes=task.num_channels,
        timestep_sampler=task.timestep_sampler,
    )
    xt, x0 = np.asarray(out.xt, np.float64), np.asarray(out.x0, np.float64)
    a = _alphas_cumprod()[np.asarray(out.t)].reshape(-1, 1, 1, 1)
    eps = (xt - np.sqrt(a) * x0) / np.sqrt(1 - a)
    if output == "x0":
        x0_pred = 2.0 * np.asarray(jax.nn.softmax(logits)) - 1.0
        expected = np.square(x0_pred - x0)
    elif output == "epsilon":
        expected = np.square(eps)
    else:
        expected = np.square(np.sqrt(1 - a) * xt - eps)
    np.testing.assert_allclose(
        np.asarray(task.mse_loss(out)), expected.mean(axis=(1, 2, 3)), rtol=1e-4
    )


def test_loss_is_weighted_by_the_importance_weights_after_warm_up(info):
    """Past the warm-up (every step seen 10 times) with √E[L²] ∝ (1, 1, 1, 1, 6):
    p_t = 0.99·(0.1, 0.1, 0.1, 0.1, 0.6) + 0.01/5 and the loss is mean_b w_t L_t with
    w_t = 1/(5 p_t) ≈ (1.98, …, 0.34), neither 1 nor 5 p_t."""
    cfg = _config("diffusion.strategy=standard")
    task = tasks.Task(cfg, info)
    state = idf.TimestepSamplerState(
        loss_sq=jnp.asarray([1.0, 1.0, 1.0, 1.0, 36.0]), count=jnp.full((5,), 10, jnp.int32)
    )
    batch = _batch(info.num_channels)
    params = task.init_params(jax.random.key(0))
    loss, (per_t, t, _) = jax.jit(task.loss)(
        params, jax.random.key(6), batch["image"], batch["label"], state
    )
    p = 0.99 * np.asarray([0.1, 0.1, 0.1, 0.1, 0.6]) + 0.01 / 5
    w = 1.0 / (5 * p[np.asarray(t)])
    per_t = np.asarray(per_t)
    np.testing.assert_allclose(float(loss), np.mean(w * per_t), rtol=1e-5)
    assert abs(float(loss) - np.mean(per_t)) > 0.05 * np.mean(per_t)  # weight not dropped
    inverted = np.mean(per_t / w)
    assert abs(float(loss) - inverted) > 0.05 * inverted  # nor inverted


def test_importance_history_gets_the_loss_at_t_without_the_auxiliary_term(info):
    """The first pass of recycle_next runs at t + 1: its auxiliary loss is trained but
    must not enter the history of step t. Same key, same t: L_t is the same with and
    without the auxiliary term, the training loss is not."""
    batch = _batch(info.num_channels)
    results = []
    for aux in (0.0, 1.0):
        cfg = _config(f"diffusion.strategy=recycle_next,loss.aux={aux}")
        task = tasks.Task(cfg, info)
        params = task.init_params(jax.random.key(0))
        loss = jax.jit(task.loss)(
            params, jax.random.key(3), batch["image"], batch["label"], task.init_aux()
        )
        results.append(jax.device_get(loss))
    (loss_plain, (per_t_plain, t_plain, logs_plain)), (loss_aux, (per_t_aux, t_aux, logs)) = results
    np.testing.assert_array_equal(t_plain, t_aux)
    np.testing.assert_allclose(per_t_aux, per_t_plain, rtol=1e-6)
    assert "aux" in logs and "aux" not in logs_plain
    # Warm-up weights are 1: the training loss is the mean of L_t + aux.
    np.testing.assert_allclose(loss_aux, np.mean(per_t_plain) + logs["aux"], rtol=1e-5)
    assert loss_aux > loss_plain


@pytest.mark.parametrize(("preset", "blocks"), [("debug", 1), ("dgm4miccai2023", 2)])
def test_model_decoder_reaches_the_network(info, preset, blocks):
    """model.decoder="original" (paper presets): num_res_blocks + 1 decoder blocks per level."""
    task = tasks.Task(_config(preset=preset), info)
    net = nnx.eval_shape(lambda: task._network(jax.random.key(0)))
    assert net.decoder_kind == ("original" if blocks == 2 else "mirrored")
    assert len(net.decoder[0]) == blocks
