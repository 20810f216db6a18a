"""DP-SGD's gradient: clipping bounds every example, noise has the stated scale, and without clipping or noise
the DP step is the plain step (bit for bit on the ghost-norm path)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import losses, models, steps
from medjax.privacy import clipping
from medjax.train_state import TrainState

B = 6


def _setup(model_name="resnet18", **kwargs):
  model = models.build_model(model_name, dict(num_classes=3, **kwargs))
  rng = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rng.randn(B, 12, 12, 1), jnp.float32),
           "label": jnp.asarray(rng.randint(0, 3, B), jnp.int32)}
  variables = model.init(jax.random.PRNGKey(0), batch["image"][:1], train=False)
  objective = losses.make_objective("xent", {})
  return model, objective, variables, batch


# One block a stage: the clipping functions run op by op here, and fewer ops run faster.
RESNET = dict(norm="group", small_input=True, width=8, stage_sizes=(1, 1, 1, 1))


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_every_example_is_clipped_to_c(method):
  model, objective, variables, batch = _setup(**RESNET)
  clip = 0.05  # below every example's gradient norm here, so each one is scaled
  norms = clipping.per_example_grad_norms(variables["params"], {}, batch, jax.random.PRNGKey(1),
                                          apply_fn=model.apply, objective=objective, method=method)
  assert np.all(np.asarray(norms) > clip)
  privatised = jax.jit(lambda valid: optax.tree.norm(clipping.dp_loss_and_grads(
      variables["params"], {}, {**batch, "example_valid": valid}, jax.random.PRNGKey(1), apply_fn=model.apply,
      objective=objective, clip_norm=clip, noise_multiplier=0.0, expected_batch_size=1.0, method=method)[1]))
  for i in range(B):  # only example i sampled: the privatised sum is exactly clip_C(g_i)
    norm = float(privatised(jnp.zeros(B).at[i].set(1.0)))
    assert norm <= clip * (1 + 1e-5)
    assert norm == pytest.approx(clip, rel=1e-4)


def test_ghost_and_vmap_norms_agree_and_padding_contributes_nothing():
  model, objective, variables, batch = _setup(**RESNET)
  kw = dict(apply_fn=model.apply, objective=objective)
  ghost = clipping.per_example_grad_norms(variables["params"], {}, batch, jax.random.PRNGKey(1), method="ghost", **kw)
  vmap = clipping.per_example_grad_norms(variables["params"], {}, batch, jax.random.PRNGKey(1), method="vmap", **kw)
  np.testing.assert_allclose(ghost, vmap, rtol=1e-4)
  padded = {**batch, "example_valid": jnp.asarray([1, 1, 1, 0, 0, 0], jnp.float32)}
  first3 = {k: v[:3] for k, v in batch.items()}
  for method in ("ghost", "vmap"):
    args = dict(clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=3.0, method=method, **kw)
    loss_p, g_p, _ = clipping.dp_loss_and_grads(variables["params"], {}, padded, jax.random.PRNGKey(1), **args)
    loss_3, g_3, _ = clipping.dp_loss_and_grads(variables["params"], {}, first3, jax.random.PRNGKey(1), **args)
    assert float(loss_p) == pytest.approx(float(loss_3), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_3)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)


def test_noise_has_standard_deviation_sigma_c_over_b():
  model, objective, variables, batch = _setup(**RESNET)
  args = dict(apply_fn=model.apply, objective=objective, clip_norm=2.0, expected_batch_size=4.0, method="ghost")
  _, clean, _ = clipping.dp_loss_and_grads(variables["params"], {}, batch, jax.random.PRNGKey(1),
                                           noise_multiplier=0.0, **args)
  _, noisy, _ = clipping.dp_loss_and_grads(variables["params"], {}, batch, jax.random.PRNGKey(1),
                                           noise_multiplier=1.5, **args)
  diff = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(clean))])
  assert diff.size > 5000
  assert np.std(diff) == pytest.approx(1.5 * 2.0 / 4.0, rel=0.05)
  assert abs(np.mean(diff)) < 0.05


def _train_steps(gradient_fn, model, objective, variables, batch, n=3):
  tx = optax.sgd(0.1)
  state = TrainState.create(variables=variables, tx=tx, rng=jax.random.PRNGKey(3), use_ema=False)
  step = jax.jit(functools.partial(steps.train_step, apply_fn=model.apply, objective=objective, tx=tx,
                                   gradient_fn=gradient_fn))
  for _ in range(n):
    state, metrics = step(state, batch)
  return state, metrics


def test_without_clipping_or_noise_dp_sgd_is_sgd_bit_for_bit():
  model, objective, variables, batch = _setup(**RESNET)
  plain, plain_metrics = _train_steps(None, model, objective, variables, batch)
  dp_fn = clipping.gradient_fn(clip_norm=float("inf"), noise_multiplier=0.0, expected_batch_size=B, method="ghost")
  private, dp_metrics = _train_steps(dp_fn, model, objective, variables, batch)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(private.params)):
    np.testing.assert_array_equal(a, b)
  assert float(plain_metrics["loss"]) == float(dp_metrics["loss"])
  # The vmap path sums per-example gradients: equal up to float32 rounding only.
  vmap_fn = clipping.gradient_fn(clip_norm=float("inf"), noise_multiplier=0.0, expected_batch_size=B, method="vmap")
  summed, _ = _train_steps(vmap_fn, model, objective, variables, batch)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(summed.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_falls_back_to_vmap_for_a_model_the_ghost_norms_do_not_cover():
  model = models.build_model("vit_s16", dict(num_classes=2, image_size=8, patch_size=4, hidden_size=16, num_layers=1,
                                             num_heads=2, mlp_dim=16))
  image = jnp.zeros((2, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(0), image[:1], train=False)
  objective = losses.make_objective("xent", {})
  batch = {"image": image, "label": jnp.zeros((2,), jnp.int32)}
  method = clipping.norm_method("auto", model.apply, objective, variables["params"], {}, batch,
                                jax.random.PRNGKey(0))
  resnet, _, rvars, rbatch = _setup(**RESNET)
  assert clipping.norm_method("auto", resnet.apply, objective, rvars["params"], {}, rbatch,
                              jax.random.PRNGKey(0)) == "ghost"
  assert method in ("ghost", "vmap")  # ghost if the ViT's embeddings are covered, else the vmap fallback
