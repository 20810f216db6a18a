"""Domain-adversarial training (DANN; Ganin et al. 2016, JMLR 17(59), "Domain-Adversarial Training of Neural
Networks"): a wrapper that adds a domain classifier on the task model's pooled features behind a gradient
reversal layer, so that one ordinary train step both fits the domain classifier and pushes the features
towards being uninformative of the domain (site, scanner).

The wrapper is a model like any other: `DomainAdversarial(model=<built medjax model>, num_domains=K,
total_steps=T)` returns the task model's `(outputs, aux)` with `aux["domain_logits"]` added, and the objective
(`medjax.losses.domain.domain_adversarial_objective`) adds the domain cross-entropy to the task loss. With the
reversal in the forward pass, minimising that sum trains the domain head to classify the domain while the
encoder receives the negated (and scaled) gradient of the domain loss: the minimax of the paper in one step.

Variables: the task model is the submodule `model` (`params["model"]`, in the model's own names: what
`task_model_variables` extracts for export or a downstream `init_from`), the domain classifier is
`params["domain_classifier"]`, and the schedule's step counter is the int32 scalar
`variables["domain_adversarial"]["step"]` (`STEP_COLLECTION`). The counter advances once per training forward
pass (`train=True`, never at init); under gradient accumulation that is once per micro-batch, so set
`total_steps` to optimizer steps x accumulation steps there. It is an integer leaf, so the train step's EMA copies
it rather than averaging it, and a non-finite step leaves it where it was.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.base import pooled_features, submodule_variables

STEP_COLLECTION = "domain_adversarial"
TASK_MODEL = "model"
DOMAIN_CLASSIFIER = "domain_classifier"
SCHEDULES = ("ganin", "constant")
GANIN_GAMMA = 10.0  # Ganin et al. 2016 (their training schedule): lambda_p = 2 / (1 + exp(-10 p)) - 1

__all__ = [
    "DOMAIN_CLASSIFIER", "GANIN_GAMMA", "SCHEDULES", "STEP_COLLECTION", "TASK_MODEL", "DomainAdversarial",
    "DomainClassifier", "gradient_reversal", "reversal_coefficient", "task_model_variables",
]


@jax.custom_vjp
def gradient_reversal(x: jax.Array, coefficient: jax.Array) -> jax.Array:
  """Identity in the forward pass; multiplies the incoming gradient by `-coefficient` in the backward pass.

  Args:
    x: any array (any shape, floating dtype).
    coefficient: scalar float (may be traced); it receives a zero gradient.
  Returns: `x` unchanged (same shape and dtype).
  """
  return x


def _reversal_fwd(x, coefficient):
  return x, coefficient


def _reversal_bwd(coefficient, g):
  # The coefficient is a schedule value, not something to learn: its cotangent is zero.
  return (-coefficient * g).astype(g.dtype), jnp.zeros_like(coefficient)


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


def reversal_coefficient(step: jax.Array, total_steps: int, *, schedule: str = "ganin",
                         coefficient: float = 1.0) -> jax.Array:
  """The gradient-reversal coefficient at `step` (scalar float32).

  "ganin": coefficient * (2 / (1 + exp(-gamma p)) - 1) with p = clip(step / total_steps, 0, 1) and gamma = 10
  (Ganin et al. 2016): 0 at the start, so the domain head learns before the encoder is pushed, rising to about
  `coefficient` (0.99991 x) at the end. "constant": `coefficient` at every step.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"DomainAdversarial: schedule must be one of {SCHEDULES}, got {schedule!r}.")
  if schedule == "constant":
    return jnp.float32(coefficient)
  if total_steps <= 0:
    raise ValueError(f"DomainAdversarial: total_steps must be positive for the 'ganin' schedule, got {total_steps}.")
  p = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.float32(total_steps), 0.0, 1.0)
  return jnp.float32(coefficient) * (2.0 / (1.0 + jnp.exp(-GANIN_GAMMA * p)) - 1.0)


def task_model_variables(variables: Mapping[str, Any]) -> Dict[str, Any]:
  """The task model's own variables (`{"params": ..., "batch_stats": ...}` in the model's names) out of a
  DomainAdversarial's variables: no domain head, no step counter. Raises ValueError when there is no
  params/model subtree."""
  return submodule_variables(variables, TASK_MODEL, skip=STEP_COLLECTION, what="domain-adversarial task model")


class DomainClassifier(nn.Module):
  """The domain head: `(B, F)` -> logits `(B, num_domains)` float32; Dense -> ReLU -> dropout -> Dense, or one
  Dense when `hidden_features` is 0 (the paper's heads are small MLPs of this kind)."""
  num_domains: int
  hidden_features: int = 256
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, h, *, train: bool) -> jax.Array:
    h = h.astype(jnp.float32)
    if self.hidden_features:
      h = nn.relu(nn.Dense(self.hidden_features, dtype=jnp.float32, name="hidden")(h))
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return nn.Dense(self.num_domains, dtype=jnp.float32, name="out")(h).astype(jnp.float32)


class DomainAdversarial(nn.Module):
  """A task model plus a domain classifier on its gradient-reversed pooled features (DANN).

  Fields:
    model: the task model (any medjax model exposing aux["features"] (B, F) or aux["bottleneck"]); kept as the
      submodule `model`.
    num_domains: number of domains K (sites, scanners); ids are 0..K-1.
    total_steps: training steps over which the "ganin" schedule rises (p = step / total_steps).
    hidden_features: width of the domain classifier's hidden layer (Dense -> ReLU -> dropout -> Dense);
      0 = a linear domain head.
    schedule: "ganin" (2 / (1 + exp(-10 p)) - 1, times `coefficient`) or "constant" (`coefficient`).
    coefficient: the reversal coefficient's maximum ("ganin") or value ("constant").
    dropout_rate: dropout after the hidden layer in training (the "dropout" rng stream).

  `__call__(x (B, *spatial, C), *, train)` -> the task model's `(outputs, aux)` with aux["domain_logits"]
  `(B, K)` float32. The domain head computes in float32 whatever the task model's dtype.
  """
  model: nn.Module
  num_domains: int
  total_steps: int
  hidden_features: int = 256
  schedule: str = "ganin"
  coefficient: float = 1.0
  dropout_rate: float = 0.0

  def _check_fields(self) -> None:
    if self.num_domains < 2:
      raise ValueError(f"DomainAdversarial: num_domains must be at least 2, got {self.num_domains}.")
    if self.hidden_features < 0:
      raise ValueError(f"DomainAdversarial: hidden_features must be >= 0, got {self.hidden_features}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"DomainAdversarial: dropout_rate must be in [0, 1), got {self.dropout_rate}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"DomainAdversarial: schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
    if self.schedule == "ganin" and self.total_steps <= 0:
      raise ValueError(f"DomainAdversarial: total_steps must be positive for the 'ganin' schedule, got "
                       f"{self.total_steps}.")

  @nn.compact
  def __call__(self, x, *, train: bool) -> Tuple[Any, Dict[str, Any]]:
    self._check_fields()
    outputs, aux = self.model(x, train=train)
    features = pooled_features(aux, f"DomainAdversarial over {type(self.model).__name__}")
    step = self.variable(STEP_COLLECTION, "step", lambda: jnp.zeros((), jnp.int32))
    current = step.value
    if train and not self.is_initializing():
      if not self.is_mutable_collection(STEP_COLLECTION):
        raise ValueError(f"DomainAdversarial: training forward passes advance the schedule counter; apply with "
                         f"mutable including {STEP_COLLECTION!r} (the train step makes every collection of the "
                         f"initial variables mutable).")
      step.value = current + 1
    lam = reversal_coefficient(current, self.total_steps, schedule=self.schedule, coefficient=self.coefficient)
    h = gradient_reversal(features, jax.lax.stop_gradient(lam))
    logits = DomainClassifier(self.num_domains, self.hidden_features, self.dropout_rate,
                              name=DOMAIN_CLASSIFIER)(h, train=train)
    return outputs, {**aux, "domain_logits": logits}

