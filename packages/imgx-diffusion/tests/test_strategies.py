"""Training strategies: inputs of each pass, gradient stopping, jit and a 2-device mesh."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import imgx_diffusion as idf

from . import toy

NUM_CLASSES = 3
T = 5
DIFF = idf.GaussianDiffusion.from_betas(idf.beta_schedule("linear", 1001)).respace(T)
SAMPLER = idf.TimestepSampler("uniform")
IMAGE = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
LABEL = jax.random.randint(jax.random.key(1), (4, 4, 4), 0, NUM_CLASSES)
TWO_PASS = ("recycle_next", "recycle_last", "self_cond_same", "self_cond_next")


def _params(strategy, key=2, out_channels=NUM_CLASSES):
    mask_channels = 2 * NUM_CLASSES if strategy in idf.SELF_CONDITIONING_STRATEGIES else NUM_CLASSES
    return toy.init_params(jax.random.key(key), 1, mask_channels, out_channels)


def _run(strategy, model_fn, key=3, diffusion=DIFF, **kwargs):
    return idf.apply_strategy(
        strategy,
        diffusion,
        model_fn,
        jax.random.key(key),
        IMAGE,
        LABEL,
        SAMPLER.init(diffusion.num_timesteps),
        num_classes=NUM_CLASSES,
        timestep_sampler=SAMPLER,
        **kwargs,
    )


@pytest.mark.parametrize("strategy", TWO_PASS)
def test_gradient_reaches_only_the_final_pass(strategy):
    first, final = _params(strategy, 2), _params(strategy, 4)

    def loss(first, final, use_first_pass_logits):
        out = _run(strategy, toy.pass_indexed_model([first, final]))
        if use_first_pass_logits:
            seg, _ = idf.segmentation_loss(out.first_pass_logits, LABEL)
            return jnp.mean(seg)
        seg, _ = idf.segmentation_loss(out.logits, LABEL)
        return jnp.mean(out.weight * (seg + out.mse))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grad_first, grad_final = grad(first, final, False)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad_first))
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grad_final))
    # The optional auxiliary loss on the first pass trains the first pass only.
    grad_first, grad_final = grad(first, final, True)
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grad_first))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad_final))


def _first_pass_x0(params, record_entry):
    mask_input, t_net = record_entry
    return idf.x0_from_logits(toy.apply(params, IMAGE, mask_input, t_net))


def _check_posterior_step_from_first_pass(out, params, record, first_t):
    """x_t must be the posterior mean from x_{t+1} (read where in() did not clip)."""
    mask_first = record[0][0][..., :NUM_CLASSES]
    x_next = 2.0 * mask_first - 1.0
    expected, _, _ = DIFF.q_posterior_mean_variance(
        _first_pass_x0(params, record[0]), x_next, first_t
    )
    unclipped = (mask_first > 0) & (mask_first < 1)
    assert float(unclipped.mean()) > 0.3
    np.testing.assert_allclose(
        jnp.where(unclipped, out.xt, 0.0), jnp.where(unclipped, expected, 0.0), atol=1e-5
    )


def test_self_cond_next_second_pass_sees_xt_not_x_next():
    params = _params("self_cond_next")
    record = []
    out = _run("self_cond_next", toy.pass_indexed_model([params], record))
    (m1, t1), (m2, t2) = record
    assert int(out.t.max()) < T - 1
    np.testing.assert_allclose(t1, DIFF.model_time(out.t + 1))
    np.testing.assert_allclose(t2, DIFF.model_time(out.t))
    np.testing.assert_array_equal(m1[..., NUM_CLASSES:], 0.0)
    np.testing.assert_allclose(m2[..., :NUM_CLASSES], idf.mask_from_x(out.xt), atol=1e-6)
    assert not np.allclose(m2[..., :NUM_CLASSES], m1[..., :NUM_CLASSES])
    _check_posterior_step_from_first_pass(out, params, record, out.t + 1)
    # The condition is in(x̂_0) of the first pass or zero, per sample.
    cond = m2[..., NUM_CLASSES:]
    first_mask = idf.mask_from_x(_first_pass_x0(params, record[0]))
    for b in range(IMAGE.shape[0]):
        assert np.allclose(cond[b], 0.0) or np.allclose(cond[b], first_mask[b], atol=1e-6)


def test_self_cond_same_condition_and_times():
    params = _params("self_cond_same")
    record = []
    out = _run("self_cond_same", toy.pass_indexed_model([params], record), key=5)
    (m1, t1), (m2, t2) = record
    np.testing.assert_allclose(t1, t2)
    np.testing.assert_allclose(m1[..., :NUM_CLASSES], m2[..., :NUM_CLASSES])
    np.testing.assert_allclose(m1[..., :NUM_CLASSES], idf.mask_from_x(out.xt), atol=1e-6)
    np.testing.assert_array_equal(m1[..., NUM_CLASSES:], 0.0)


# A larger batch of tiny images for the rate of self-conditioning (one Bernoulli per sample).
COND_BATCH = 128
COND_KEYS = (11, 12, 13)
COND_IMAGE = jax.random.normal(jax.random.key(20), (COND_BATCH, 2, 2, 1))
COND_LABEL = jax.random.randint(jax.random.key(21), (COND_BATCH, 2, 2), 0, NUM_CLASSES)


@pytest.mark.parametrize("strategy", idf.SELF_CONDITIONING_STRATEGIES)
def test_self_condition_is_the_first_prediction_for_half_of_the_samples(strategy):
    params = _params(strategy)
    kept_per_key = []
    for key in COND_KEYS:
        record = []
        idf.apply_strategy(
            strategy,
            DIFF,
            toy.pass_indexed_model([params], record),
            jax.random.key(key),
            COND_IMAGE,
            COND_LABEL,
            SAMPLER.init(T),
            num_classes=NUM_CLASSES,
            timestep_sampler=SAMPLER,
        )
        (m1, t1), (m2, _) = record
        cond = np.asarray(m2[..., NUM_CLASSES:])
        # in(x̂_0) of the first pass: softmax probabilities, never exactly 0.
        first_mask = np.asarray(
            idf.mask_from_x(idf.x0_from_logits(toy.apply(params, COND_IMAGE, m1, t1)))
        )
        assert first_mask.min() > 0.0
        zero = np.all(cond == 0.0, axis=(1, 2, 3))
        exact = np.all(np.abs(cond - first_mask) <= 1e-6, axis=(1, 2, 3))
        # Per sample, all of the condition or none of it.
        np.testing.assert_array_equal(zero | exact, True)
        assert 0 < int(exact.sum()) < COND_BATCH
        kept_per_key.append(exact)
    kept = np.stack(kept_per_key)
    # P(kept) = 1/2 per sample: the count is Binomial(n, 1/2), within 4 standard deviations.
    n = kept.size
    assert abs(int(kept.sum()) - n / 2) < 4 * math.sqrt(n / 4)
    # Each key draws its own samples.
    assert not np.array_equal(kept[0], kept[1]) and not np.array_equal(kept[1], kept[2])


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_self_conditioning_probability_is_the_share_of_conditioned_samples(probability):
    params = _params("self_cond_same")
    record = []
    idf.apply_strategy(
        "self_cond_same",
        DIFF,
        toy.pass_indexed_model([params], record),
        jax.random.key(11),
        COND_IMAGE,
        COND_LABEL,
        SAMPLER.init(T),
        num_classes=NUM_CLASSES,
        timestep_sampler=SAMPLER,
        self_conditioning_probability=probability,
    )
    (m1, t1), (m2, _) = record
    first_mask = idf.mask_from_x(idf.x0_from_logits(toy.apply(params, COND_IMAGE, m1, t1)))
    expected = first_mask if probability == 1.0 else jnp.zeros_like(first_mask)
    np.testing.assert_allclose(m2[..., NUM_CLASSES:], expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _run("self_cond_same", toy.pass_indexed_model([params]), self_conditioning_probability=2)


# t range of the final pass and step of the first pass, per strategy (spec §7). JAX clamps
# an out-of-range index silently, so the drawn indices themselves are checked: on 128
# uniform draws every step of the range appears (P(a step is missed) < 5·(4/5)^128).
T_RANGES = [
    ("standard", {}, T, None),
    ("self_cond_same", {}, T, lambda t: t),
    ("recycle_next", {}, T - 1, lambda t: t + 1),
    ("recycle_last", {}, T - 1, lambda t: jnp.full_like(t, T - 1)),
    ("self_cond_next", {}, T - 1, lambda t: t + 1),
    # DGM4MICCAI 2023 code: t from [0, T), first pass at min(t + 1, T − 1).
    ("recycle_next", {"recycle_next_clipped": True}, T, lambda t: jnp.minimum(t + 1, T - 1)),
]


@pytest.mark.parametrize(
    ("strategy", "options", "t_max", "first_step"),
    T_RANGES,
    ids=[f"{s}{'-clipped' if o else ''}" for s, o, _, _ in T_RANGES],
)
def test_t_range_of_each_strategy(strategy, options, t_max, first_step):
    record = []
    out = idf.apply_strategy(
        strategy,
        DIFF,
        toy.pass_indexed_model([_params(strategy)], record),
        jax.random.key(5),
        COND_IMAGE,
        COND_LABEL,
        SAMPLER.init(T),
        num_classes=NUM_CLASSES,
        timestep_sampler=SAMPLER,
        **options,
    )
    assert sorted(set(np.asarray(out.t).tolist())) == list(range(t_max))
    np.testing.assert_allclose(record[-1][1], DIFF.model_time(out.t))
    if first_step is not None:
        np.testing.assert_allclose(record[0][1], DIFF.model_time(first_step(out.t)))


def _keys_of_apply_strategy(key):
    """The keys apply_strategy splits off: (t, first noise ε', noise ε, model 1, model 2, cond)."""
    return jax.random.split(jax.random.key(key), 6)


@pytest.mark.parametrize("strategy", ["recycle_last", "recycle_next"])
def test_recycling_renoises_the_first_prediction_not_the_ground_truth(strategy):
    params = _params(strategy)
    record = []
    key = 3
    out = _run(strategy, toy.pass_indexed_model([params], record), key=key)
    (m1, t1), (m2, t2) = record
    _, k_noise_first, k_noise, _, _, _ = _keys_of_apply_strategy(key)
    eps_first = jax.random.normal(k_noise_first, out.x0.shape)
    eps = jax.random.normal(k_noise, out.x0.shape)
    # First pass: in(q(x_0, ε', t_first)) at t_first = T − 1 (recycle_last) or t + 1.
    t_first = jnp.full_like(out.t, T - 1) if strategy == "recycle_last" else out.t + 1
    np.testing.assert_allclose(t1, DIFF.model_time(t_first))
    np.testing.assert_allclose(
        m1, idf.mask_from_x(DIFF.q_sample(out.x0, eps_first, t_first)), atol=1e-6
    )
    # Second pass: x_t = q(sg x̂_0, ε, t) with x̂_0 the first pass's estimate, same noise ε.
    x0_hat = idf.x0_from_logits(toy.apply(params, IMAGE, m1, t1))
    expected = DIFF.q_sample(x0_hat, eps, out.t)
    np.testing.assert_allclose(t2, DIFF.model_time(out.t))
    np.testing.assert_allclose(out.xt, expected, atol=1e-5)
    np.testing.assert_allclose(m2, idf.mask_from_x(expected), atol=1e-6)
    from_truth = DIFF.q_sample(out.x0, eps, out.t)
    assert float(jnp.max(jnp.abs(out.xt - from_truth))) > 0.1


def test_recycle_last_first_pass_at_last_step_and_next_at_t_plus_one():
    params = _params("recycle_last")
    record = []
    out = _run("recycle_last", toy.pass_indexed_model([params], record))
    np.testing.assert_allclose(record[0][1], 1.0)  # base index 1000 → t = 1001/1001
    np.testing.assert_allclose(record[1][1], DIFF.model_time(out.t))
    record = []
    out = _run(
        "recycle_next", toy.pass_indexed_model([params], record), recycle_with_posterior_mean=True
    )
    np.testing.assert_allclose(record[0][1], DIFF.model_time(out.t + 1))
    _check_posterior_step_from_first_pass(out, params, record, out.t + 1)


def test_standard_with_oracle_and_targets():
    # An x0-model that knows the answer: confident logits of the true label.
    def oracle(image, mask_input, t, key):
        return 40.0 * jax.nn.one_hot(LABEL, NUM_CLASSES)

    out = _run("standard", oracle)
    assert out.first_pass_logits is None and out.vlb is None
    np.testing.assert_allclose(out.mse, 0.0, atol=1e-8)
    np.testing.assert_array_equal(jnp.argmax(out.logits, -1), LABEL)
    np.testing.assert_allclose(out.x0, 2.0 * jax.nn.one_hot(LABEL, NUM_CLASSES) - 1.0)
    np.testing.assert_allclose(out.weight, 1.0)
    # ε-parameterisation: the MSE compares the raw output with ε = (x_t − √ᾱ x_0)/√(1−ᾱ).
    eps_diff = idf.GaussianDiffusion.from_betas(DIFF.betas, model_output="epsilon")
    zero = _run("standard", lambda *a: jnp.zeros(LABEL.shape + (NUM_CLASSES,)), diffusion=eps_diff)
    eps = eps_diff.predict_epsilon_from_x0(zero.xt, zero.x0, zero.t)
    np.testing.assert_allclose(zero.mse, jnp.mean(eps**2, axis=(1, 2, 3)), rtol=1e-5)


def test_configuration_errors():
    model = toy.pass_indexed_model([_params("standard")])
    with pytest.raises(ValueError, match="recycle_last"):
        _run("recycle_and_self_cond", model)
    with pytest.raises(ValueError, match="recycle_next"):
        _run("recycle_last", model, recycle_with_posterior_mean=True)
    with pytest.raises(ValueError, match="recycle_next"):
        _run("recycle_last", model, recycle_next_clipped=True)
    with pytest.raises(ValueError, match="cannot be combined"):
        _run("recycle_next", model, recycle_next_clipped=True, recycle_with_posterior_mean=True)
    learned = idf.GaussianDiffusion.from_betas(DIFF.betas, variance="learned_range")
    with pytest.raises(ValueError, match="compute_vlb"):
        _run("standard", model, diffusion=learned)


def test_learned_range_returns_the_variational_bound():
    learned = idf.GaussianDiffusion.from_betas(DIFF.betas, variance="learned_range")
    params = _params("standard", out_channels=2 * NUM_CLASSES)
    out = _run("standard", toy.pass_indexed_model([params]), diffusion=learned, compute_vlb=True)
    assert out.vlb.shape == (4,) and bool(jnp.all(jnp.isfinite(out.vlb)))
    assert bool(jnp.all(out.vlb >= 0))


@pytest.mark.parametrize("strategy", idf.STRATEGIES)
def test_strategy_under_jit_on_a_two_device_mesh(strategy):
    devices = jax.devices()
    assert len(devices) == 2, "conftest sets 2 CPU devices"
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    params = _params(strategy)
    timestep_sampler = idf.TimestepSampler("importance")
    state = timestep_sampler.init(T)

    @functools.partial(jax.jit, static_argnums=0)
    def step(strategy, params, state, image, label, key):
        def loss_fn(params):
            out = idf.apply_strategy(
                strategy,
                DIFF,
                lambda *args: toy.apply(params, *args[:3]),
                key,
                image,
                label,
                state,
                num_classes=NUM_CLASSES,
                timestep_sampler=timestep_sampler,
            )
            seg, _ = idf.segmentation_loss(out.logits, label)
            return jnp.mean(out.weight * seg), (out.t, seg)

        grads, (t, seg) = jax.grad(loss_fn, has_aux=True)(params)
        return grads, timestep_sampler.update(state, t, seg)

    key = jax.random.key(7)
    expected = step(strategy, params, state, IMAGE, LABEL, key)
    batch = NamedSharding(mesh, P("data"))
    image, label = jax.device_put(IMAGE, batch), jax.device_put(LABEL, batch)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    got = step(strategy, params, state, image, label, key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)
    assert int(got[1].count.sum()) == IMAGE.shape[0]


def test_bfloat16_network_hands_over_to_float32():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params("recycle_last"))

    def model_fn(image, mask_input, t, key):
        cast = lambda x: x.astype(jnp.bfloat16)
        return toy.apply(params, cast(image), cast(mask_input), cast(t))

    out = _run("recycle_last", model_fn)
    assert out.logits.dtype == out.xt.dtype == out.mse.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out.logits))) and bool(jnp.all(jnp.isfinite(out.mse)))
