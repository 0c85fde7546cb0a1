"""The drifts of ppo.py and dpo.py: Mirror Learning's properties, PPO's identity, DPO's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpo
import ppo

RATIOS = jnp.linspace(0.05, 3.0, 60)
ADVANTAGES = jnp.array([-3.0, -1.7, -1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0, 2.3, 3.0])
R, A = jnp.meshgrid(RATIOS, ADVANTAGES)

DRIFTS = {
    "ppo": lambda r, a: ppo.ppo_drift(r, a, 0.2),
    "dpo": lambda r, a: dpo.dpo_drift(r, a, 2.0, 0.6),
}


@pytest.mark.parametrize("name", DRIFTS)
def test_drift_is_nonnegative_zero_and_flat_at_ratio_one(name):
    drift = DRIFTS[name]
    assert jnp.all(drift(R, A) >= 0)
    ones = jnp.ones_like(ADVANTAGES)
    np.testing.assert_array_equal(drift(ones, ADVANTAGES), 0.0)
    slope = jax.vmap(jax.grad(drift), in_axes=(0, 0))(ones, ADVANTAGES)
    np.testing.assert_array_equal(slope, 0.0)


def test_ppo_objective_is_the_clipped_objective_in_value_and_gradient():
    def mirror(r, a):
        return r * a - ppo.ppo_drift(r, a, 0.2)

    def clipped(r, a):
        return jnp.minimum(r * a, jnp.clip(r, 0.8, 1.2) * a)

    r, a = R.ravel(), A.ravel()
    np.testing.assert_allclose(mirror(r, a), clipped(r, a), rtol=1e-6, atol=1e-6)
    # at the kinks r = 1 ± ε either one-sided gradient is valid; compare everywhere else
    smooth = (jnp.abs(r - 0.8) > 1e-3) & (jnp.abs(r - 1.2) > 1e-3)
    r, a = r[smooth], a[smooth]
    grad_mirror = jax.vmap(jax.grad(mirror))(r, a)
    grad_clipped = jax.vmap(jax.grad(clipped))(r, a)
    np.testing.assert_allclose(grad_mirror, grad_clipped, rtol=1e-6, atol=1e-6)


def test_dpo_drift_matches_the_formula():
    r, a = np.asarray(R, np.float64).ravel(), np.asarray(A, np.float64).ravel()
    alpha, beta = 2.0, 0.6
    pos = np.maximum((r - 1) * a - alpha * np.tanh((r - 1) * a / alpha), 0)
    neg = np.maximum(np.log(r) * a - beta * np.tanh(np.log(r) * a / beta), 0)
    expected = np.where(a >= 0, pos, neg)
    np.testing.assert_allclose(dpo.dpo_drift(R.ravel(), A.ravel(), alpha, beta), expected, rtol=1e-5, atol=1e-6)


def test_dpo_objective_for_positive_advantage_is_capped_at_advantage_plus_alpha():
    r = jnp.linspace(1.0, 50.0, 2000)
    for a in (0.5, 1.0, 3.0):
        objective = r * a - dpo.dpo_drift(r, a * jnp.ones_like(r), 2.0, 0.6)
        assert float(objective.max()) <= a + 2.0 + 1e-4
        assert float(objective[-1]) > a + 2.0 - 1e-2  # reaches the cap, smoothly from below


@pytest.mark.parametrize("advantage, r_star", [(-0.5, 0.41), (-1.0, 0.56), (-2.0, 0.70), (-3.0, 0.76)])
def test_dpo_rolls_back_below_the_interior_maximum(advantage, r_star):
    r = jnp.linspace(0.01, 1.0, 100_000)
    a = jnp.full_like(r, advantage)
    objective = r * a - dpo.dpo_drift(r, a, 2.0, 0.6)
    found = float(r[jnp.argmax(objective)])
    assert abs(found - r_star) < 0.01
    slope = jax.vmap(jax.grad(lambda x, y: x * y - dpo.dpo_drift(x, y, 2.0, 0.6)))(r, a)
    assert jnp.all(slope[r < found - 0.01] > 0)  # below r* the gradient pushes the ratio back up
    assert jnp.all(slope[(r > found + 0.01) & (r < 0.99)] < 0)


@pytest.mark.parametrize("name", DRIFTS)
def test_gradients_stay_finite_where_the_ratio_underflows(name):
    # training computes r = exp(log π_new − log π_old); below log r ≈ −87 r is 0 or subnormal, and log(0) = −inf
    # would turn the gradient NaN through either branch of DPO's where (before the fix: NaN for both signs of Â)
    log_r = jnp.array([-10.0, -80.0, -90.0, -104.0, -200.0])
    for a in (-1.0, 0.0, 1.0):
        objective = lambda x, a=a: jnp.exp(x) * a - DRIFTS[name](jnp.exp(x), a)
        assert jnp.all(jnp.isfinite(jax.vmap(objective)(log_r)))
        assert jnp.all(jnp.isfinite(jax.vmap(jax.grad(objective))(log_r)))
