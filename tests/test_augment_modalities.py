"""Augmentation of multimodal batches: aligned transforms of co-registered modalities, absent images kept zero,
modality dropout that never removes a case's last source, and refusals that name the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import augment_modalities


def _inputs(size=64, shape=(6, 5), present_t2=None):
  rng = np.random.default_rng(0)
  t1 = rng.normal(size=(size, *shape, 1)).astype(np.float32)
  p2 = np.ones(size, np.float32) if present_t2 is None else np.asarray(present_t2, np.float32)
  t2 = (t1 * 2.0) * p2.reshape((-1,) + (1,) * (len(shape) + 1))
  return {"images": {"t1": jnp.asarray(t1), "t2": jnp.asarray(t2)},
          "present": {"t1": jnp.ones(size), "t2": jnp.asarray(p2)},
          "tabular": {"numeric": jnp.asarray(rng.normal(size=(size, 2)), jnp.float32),
                      "missing": jnp.zeros((size, 2)), "categorical": jnp.ones((size, 1), jnp.int32)}}


@pytest.mark.parametrize("shape", [(6, 5), (4, 6, 5)])
def test_co_registered_modalities_get_the_same_geometry_and_absent_ones_stay_zero(shape):
  present_t2 = np.arange(8) % 2
  x = _inputs(8, shape, present_t2)
  fn = augment_modalities.make_augment(dict(flip=dict(p=0.5), affine=dict(p=1.0), noise=dict(p=1.0, std=(0.1, 0.1))))
  out = jax.jit(fn)(jax.random.PRNGKey(3), {"image": x, "label": jnp.zeros(8, jnp.int32)})["image"]
  t1, t2 = np.asarray(out["images"]["t1"]), np.asarray(out["images"]["t2"])
  assert not np.allclose(t1, np.asarray(x["images"]["t1"]))
  present = present_t2.astype(bool)
  assert not np.any(t2[~present])  # noise is not written into an absent modality
  # t2 = 2 t1 before: with the same warp W and the same noise n, t2' - t1' = (2 W(t1) + n) - (W(t1) + n) = W(t1).
  no_noise = augment_modalities.make_augment(dict(flip=dict(p=0.5), affine=dict(p=1.0)))
  warped = np.asarray(no_noise(jax.random.PRNGKey(3), {"image": x})["image"]["images"]["t1"])
  np.testing.assert_allclose(t2[present] - t1[present], warped[present], atol=1e-5)
  assert not np.allclose(t1, warped)  # the noise was there


def test_modality_dropout_keeps_a_source_and_marks_the_record_missing():
  x = _inputs(512, present_t2=np.arange(512) % 4 > 0)
  options = augment_modalities.parse_dropout(dict(p=0.6))
  out = augment_modalities.modality_dropout(jax.random.PRNGKey(1), x, options)
  p1, p2 = np.asarray(out["present"]["t1"]), np.asarray(out["present"]["t2"])
  tab_kept = np.asarray(out["tabular"]["missing"]).min(axis=1) == 0
  assert np.all(p1 + p2 + tab_kept >= 1)  # never the last source
  assert np.all(p2 <= np.asarray(x["present"]["t2"]))  # an absent modality is never brought back
  for name, kept in (("t1", p1), ("t2", p2)):
    assert not np.any(np.asarray(out["images"][name])[kept == 0])
  dropped = np.asarray(out["tabular"]["missing"])[~tab_kept]
  assert np.all(dropped == 1) and not np.any(np.asarray(out["tabular"]["numeric"])[~tab_kept])
  assert not np.any(np.asarray(out["tabular"]["categorical"])[~tab_kept])
  # About p of each source goes (less than p: the last-source rescue puts some back).
  assert 0.4 < 1 - p1.mean() < 0.6 and 0.4 < 1 - tab_kept.mean() < 0.6
  only_t1 = augment_modalities.modality_dropout(jax.random.PRNGKey(1), x, dict(p=0.6, sources=("t1",)))
  np.testing.assert_array_equal(np.asarray(only_t1["present"]["t2"]), np.asarray(x["present"]["t2"]))


def test_refusals_name_the_key():
  assert augment_modalities.parse_dropout(dict(p=0.0)) is None
  with pytest.raises(ValueError, match=r"augment.modality_dropout.p must be a probability in \[0, 1\)"):
    augment_modalities.parse_dropout(dict(p=1.0))
  with pytest.raises(ValueError, match=r"augment.modality_dropout: unknown key\(s\) \['prob'\]"):
    augment_modalities.parse_dropout(dict(prob=0.2))
  with pytest.raises(ValueError, match="augment.modality_dropout.sources: 'pet' is not a source of this data"):
    augment_modalities.modality_dropout(jax.random.PRNGKey(0), _inputs(4), dict(p=0.5, sources=("pet",)))
  fn = augment_modalities.make_augment(dict(modality_dropout=dict(p=0.3)))
  with pytest.raises(ValueError, match="augment.modality_dropout needs multimodal examples"):
    fn(jax.random.PRNGKey(0), {"image": jnp.zeros((2, 4, 4, 1))})
  with pytest.raises(ValueError, match="augment.mixup is not supported for multimodal batches"):
    augment_modalities.make_augment(dict(mixup=dict(alpha=0.2), num_classes=2))(
        jax.random.PRNGKey(0), {"image": _inputs(4), "label": jnp.zeros(4, jnp.int32)})
