"""Config to parts: model (with the compute dtype), dataset, objective, optimizer, augmentation, evaluator, mesh,
the eval batch size, the state initialiser and the jitted train step."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from medjax import augment_modalities, evaluators, losses, models, optim, pretext, privacy, sharding, steps
from medjax.compress import distillation, pruning, quantize
from medjax.build.run_settings import DEFAULT_MESH, settings
from medjax.config_lib import ConfigError, named
from medjax.data import datasets
from medjax.losses import domain as domain_losses
from medjax.models import domain_adversarial
from medjax.train_state import TrainState

# config.domain_adversarial keys: the wrapper's (medjax.models.domain_adversarial) and the loss's.
DOMAIN_ADVERSARIAL_KEYS = ("num_domains", "weight", "domain_key", "hidden_features", "schedule", "coefficient",
                           "dropout_rate")


def domain_adversarial_options(config: mlc.ConfigDict) -> dict:
  """`config.domain_adversarial` checked: known keys, num_domains given (DANN, Ganin et al. 2016)."""
  options = dict(config.domain_adversarial)
  unknown = sorted(set(options) - set(DOMAIN_ADVERSARIAL_KEYS))
  if unknown:
    raise ConfigError(f"config.domain_adversarial: unknown key(s) {unknown}; known keys: "
                      f"{', '.join(DOMAIN_ADVERSARIAL_KEYS)}.")
  if int(options.get("num_domains", 0)) < 2:
    raise ConfigError("config.domain_adversarial.num_domains must be given and >= 2 (the sites or scanners).")
  if options.get("schedule", "ganin") not in domain_adversarial.SCHEDULES:
    raise ConfigError(f"config.domain_adversarial.schedule must be one of {domain_adversarial.SCHEDULES}.")
  for key in ("pretext", "federated"):
    if config.get(key):
      raise ConfigError(f"config.domain_adversarial cannot be combined with config.{key}.")
  return options


def model(config: mlc.ConfigDict):
  """The config's model (`config.model_name`, keywords `config.model`) computing in `config.compute_dtype`;
  parameters stay float32. With `config.pretext`, that model is the encoder inside the pretext task's model
  (medjax.pretext.tasks); with `config.domain_adversarial`, the task model inside DANN's wrapper (a domain
  classifier behind gradient reversal, medjax.models.domain_adversarial); with `config.distillation`, the
  student beside its teacher (the teacher run's model, `medjax.compress.distillation`). With
  `config.quantization.mode == "qat"`, the model's convolutions and dense layers are fake-quantized
  (`medjax.compress.quantize`, Qwix); mode "ptq" changes nothing in training."""
  kwargs = dict(config.get("model") or {})
  if "dtype" in kwargs:
    raise ConfigError("Set the compute dtype with config.compute_dtype, not config.model.dtype.")
  kwargs["dtype"] = jnp.dtype(settings(config).compute_dtype)
  built = models.build_model(config.model_name, kwargs)
  if config.get("quantization") and quantize.parse(config.quantization)["mode"] == "qat":
    built = quantize.qat_model(built, config.quantization)  # fake-quantized convs and dense layers (STE)
  if config.get("distillation"):
    options = distillation.check_config(config)
    return distillation.wrap(built, model(distillation.teacher_config(options)), options)
  if config.get("pretext"):
    return pretext.tasks.wrap(config.pretext, built)
  if config.get("domain_adversarial"):
    options = domain_adversarial_options(config)
    wrapper_keys = ("hidden_features", "schedule", "coefficient", "dropout_rate")
    return domain_adversarial.DomainAdversarial(model=built, num_domains=int(options["num_domains"]),
                                                total_steps=int(config.total_steps),
                                                **{k: options[k] for k in wrapper_keys if k in options})
  return built


def dataset(config: mlc.ConfigDict) -> datasets.Dataset:
  """`config.data` built (this reads or generates the data)."""
  return datasets.build_dataset(*named(config.data, "data"))


def split_source(data: datasets.Dataset, split: str, where: str):
  """The dataset's `split`, or a ConfigError naming the config key `where` and the splits there are."""
  try:
    return data.source(split)
  except KeyError:
    raise ConfigError(f"{where}: the dataset has no split {split!r}; it has "
                      f"{', '.join(map(repr, data.splits))}.") from None


def objective(config: mlc.ConfigDict) -> losses.Objective:
  """`config.loss` (a name or a dict with terms, deep supervision, tasks) as one objective; with
  `config.pretext`, the pretext task's."""
  if config.get("pretext"):
    return pretext.tasks.objective(config.pretext)
  task = losses.make_objective(*named(settings(config).loss, "loss"))
  if config.get("distillation"):
    return distillation.objective(task, distillation.check_config(config))
  if config.get("domain_adversarial"):
    options = domain_adversarial_options(config)
    return domain_losses.domain_adversarial_objective(
        task, weight=float(options.get("weight", 1.0)), domain_key=options.get("domain_key", "site"),
        num_domains=int(options["num_domains"]))
  return task


def optimizer(config: mlc.ConfigDict):
  """`(tx, schedule_fn)` from config.optim / lr / schedule / total_steps / grad_clip_norm; with `config.pruning`,
  the magnitude-pruning masks last in the chain (`medjax.compress.pruning`)."""
  tx, schedule = optim.make_optimizer(config)
  if config.get("pruning"):
    tx = pruning.wrap_optimizer(tx, config.pruning, int(config.total_steps))
  return tx, schedule


def sparsity_report(config: mlc.ConfigDict, params: Any) -> list:
  """`compress.pruning.sparsity_report` rows of `params` (exact zeros per layer, then the "prunable" weights
  config.pruning targets and the "total")."""
  return pruning.sparsity_report(params, exclude=pruning.parse(config.pruning)["exclude"])


def first_selectable_step(config: mlc.ConfigDict) -> int:
  """The first step whose checkpoint may become the run's best: with `config.pruning` its end_step (the masks
  reach the target sparsity there; an earlier, denser checkpoint would win the selection without being the
  pruned model), else 0."""
  if not config.get("pruning"):
    return 0
  end_step = pruning.parse(config.pruning)["end_step"]
  return int(config.total_steps if end_step is None else end_step)


def augment_fn(config: mlc.ConfigDict) -> Optional[Callable]:
  """The on-device augmentation chain of `config.augment`; None without one."""
  options = config.get("augment")
  if not options:
    return None
  return augment_modalities.make_augment(options)


def evaluator(config: mlc.ConfigDict, info: datasets.DatasetInfo, **overrides: Any):
  """`config.evaluator` (default: the evaluator of the dataset's task) for `info`; `overrides` set keywords
  the evaluator accepts and leaves the others alone (e.g. the evaluate tool's `surface_metrics`). A pretext run
  is evaluated by its pretext loss (`pretext.tasks.PretextEvaluator`)."""
  if config.get("pretext"):
    return pretext.tasks.PretextEvaluator(objective(config))
  name, kwargs = named(config.get("evaluator", info.task), "evaluator")
  accepted = evaluators.EVALUATORS.accepted_kwargs(name) or ()
  kwargs.update({k: v for k, v in overrides.items() if k in accepted})
  return evaluators.EVALUATORS.get(name)(info=info, **kwargs)


def mesh(config: mlc.ConfigDict, *, fallback: bool = False):
  """The config's device mesh. With `fallback`, a machine that cannot build it (a run trained on 8 devices,
  evaluated on 1) gets every device on the data axis."""
  spec = settings(config).mesh
  try:
    return sharding.make_mesh(spec)
  except ValueError:
    if not fallback:
      raise
    return sharding.make_mesh(DEFAULT_MESH)


def eval_batch_size(config: mlc.ConfigDict, mesh: Any, *, round_up: bool = False) -> int:
  """The eval batch size, checked against the data axis; `round_up` rounds it to a multiple instead (for
  tools that run on another machine than the training)."""
  batch = settings(config).eval_batch_size
  if round_up:
    n = sharding.data_axis_size(mesh) * jax.process_count()
    return -(-batch // n) * n
  sharding.check_batch_size(batch, mesh, what="config.input.eval_batch_size")
  return batch


def init_state_fn(model: Any, tx: Any, example_image: Any, use_ema: bool):
  """Returns `init(rng, variables=None) -> TrainState` for a batch-1 dummy input shaped like `example_image`
  (*spatial, C), or like every leaf of a multimodal example's input dict (zeros of each leaf's dtype). Given
  `variables` (e.g. pretrained ones merged by `checkpoint.initial_variables`), the state starts from them instead
  of the model's initialisation; the state's rng is the same either way."""

  def init(rng, variables=None):
    init_rng, state_rng = jax.random.split(rng)
    if variables is None:
      dummy = jax.tree_util.tree_map(
          lambda a: jnp.zeros((1,) + tuple(np.shape(a)), np.asarray(a).dtype if isinstance(example_image, dict)
                              else jnp.float32), example_image)
      variables = model.init({"params": init_rng, "dropout": init_rng}, dummy, train=False)
    return TrainState.create(variables=variables, tx=tx, rng=state_rng, use_ema=use_ema)

  return init


def train_apply_fn(model: Any, *, freeze_batch_stats: bool = False) -> Callable[..., Any]:
  """The training forward pass: `model.apply`, or with `freeze_batch_stats` the same with batch norms in
  inference mode (`layers.frozen_batch_stats`: running statistics used and kept)."""
  if not freeze_batch_stats:
    return model.apply

  def apply(*args, **kwargs):
    with models.layers.frozen_batch_stats():
      return model.apply(*args, **kwargs)

  return apply


def differential_privacy(config: mlc.ConfigDict, model: Any, objective: Any, abstract_state: Any, train_source: Any,
                         mesh: Any) -> Optional[privacy.DpSetup]:
  """DP-SGD's parts for `config.privacy` (None without it): the resolved `PrivacyPlan` (sigma computed for a
  target epsilon, Poisson batch padding) and the step's gradient function. Refuses a BatchNorm model."""
  if not config.get("privacy"):
    return None
  options = privacy.options.parse(config.privacy)
  privacy.options.check_model(abstract_state.model_state, config.model_name)
  plan = privacy.options.plan(options, num_examples=len(train_source), batch_size=settings(config).batch_size,
                              total_steps=int(config.total_steps),
                              batch_multiple=sharding.data_axis_size(mesh) * jax.process_count())
  example = train_source[0]
  # Every numeric key of an example, so that objectives reading more than image and label trace too.
  batch = {k: jnp.zeros((2,) + np.shape(v), jax.dtypes.canonicalize_dtype(np.asarray(v).dtype))
           for k, v in example.items()
           if np.asarray(v).dtype.kind in "biuf"}
  method = privacy.clipping.norm_method(plan.per_example_norms, train_apply_fn(model), objective,
                                        abstract_state.params, abstract_state.model_state, batch,
                                        jax.random.PRNGKey(0))
  fn = privacy.clipping.gradient_fn(clip_norm=plan.clip_norm, noise_multiplier=plan.noise_multiplier,
                                    expected_batch_size=plan.expected_batch_size, method=method,
                                    microbatch_size=plan.microbatch_size)
  return privacy.DpSetup(plan=plan, gradient_fn=fn, norms=method)


def jit_train_step(model: Any, objective: Any, tx: Any, mesh: Any, state_sharding: Any, *,
                   accum_steps: int = 1, ema_decay: float = 0.0, augment_fn: Optional[Callable] = None,
                   freeze_batch_stats: bool = False, gradient_fn: Optional[Callable] = None):
  """`steps.train_step` bound to its hyperparameters and jitted over `mesh`, the state donated.
  `freeze_batch_stats`: see `train_apply_fn`; `gradient_fn`: see `steps.train_step` (DP-SGD's).

  Batches come in split over the data axis; metrics come out replicated.
  """
  return jax.jit(
      functools.partial(steps.train_step, apply_fn=train_apply_fn(model, freeze_batch_stats=freeze_batch_stats),
                        objective=objective, tx=tx,
                        accum_steps=accum_steps, ema_decay=ema_decay, augment_fn=augment_fn,
                        gradient_fn=gradient_fn),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))
