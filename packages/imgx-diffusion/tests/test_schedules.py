"""Beta schedules and respacing against closed forms."""

import numpy as np
import pytest

import imgx_diffusion as idf


def test_linear_and_quadratic_closed_forms():
    betas = idf.beta_schedule("linear", num_timesteps=5, beta_start=0.1, beta_end=0.5)
    np.testing.assert_allclose(betas, [0.1, 0.2, 0.3, 0.4, 0.5])
    betas = idf.beta_schedule("quadratic", num_timesteps=3, beta_start=0.01, beta_end=0.09)
    np.testing.assert_allclose(betas, [0.01, 0.04, 0.09])


def test_cosine_matches_nichol_dhariwal():
    n = 10
    betas = idf.beta_schedule("cosine", num_timesteps=n)

    def f(s):
        return np.cos((s / n + 0.008) / 1.008 * np.pi / 2) ** 2

    alphas_cumprod = np.cumprod(1.0 - betas)
    # ᾱ_i = f(i+1)/f(0) whenever no beta was clipped at 0.999.
    np.testing.assert_allclose(alphas_cumprod[:-1], f(np.arange(1, n)) / f(0), rtol=1e-12)
    assert betas[-1] == pytest.approx(0.999)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="linear"):
        idf.beta_schedule("sigmoid", num_timesteps=10)


def test_respacing_indices():
    np.testing.assert_array_equal(idf.respacing_indices(1001, 5), [0, 250, 500, 750, 1000])
    np.testing.assert_array_equal(idf.respacing_indices(10, 4), [0, 3, 6, 9])
    arbitrary = idf.respacing_indices(10, 7)
    assert arbitrary[0] == 0 and arbitrary[-1] == 9 and np.all(np.diff(arbitrary) > 0)
    with pytest.raises(ValueError, match=r"\[2, 10\]"):
        idf.respacing_indices(10, 11)


def test_respace_keeps_alphas_cumprod_and_composes_maps():
    base = idf.GaussianDiffusion.from_betas(idf.beta_schedule("linear", 1001))
    t5 = base.respace(5)
    np.testing.assert_array_equal(t5.timestep_map, [0, 250, 500, 750, 1000])
    np.testing.assert_allclose(
        t5.alphas_cumprod, base.alphas_cumprod[t5.timestep_map], rtol=1e-13, atol=0
    )
    assert t5.betas[0] == pytest.approx(base.betas[0])
    # Respacing a respaced process composes the maps: T=5 → K=3 keeps base 0, 500, 1000.
    k3 = t5.respace(3)
    np.testing.assert_array_equal(k3.timestep_map, [0, 500, 1000])
    np.testing.assert_allclose(k3.alphas_cumprod, base.alphas_cumprod[[0, 500, 1000]], rtol=1e-13)
    assert k3.num_base_timesteps == 1001


def test_respace_to_same_length_is_identity():
    base = idf.GaussianDiffusion.from_betas(idf.beta_schedule("cosine", 50))
    same = base.respace(50)
    np.testing.assert_allclose(same.betas, base.betas, rtol=1e-12)
    np.testing.assert_array_equal(same.timestep_map, base.timestep_map)
