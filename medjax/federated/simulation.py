"""A federated run simulated on one machine: rounds over sites, each client's update traced once and `vmap`ped
over the round's clients (or run client after client on the device mesh), never one process per client.

  python -m medjax.main --config experiments/medmnist_federated.py:algorithm=fedprox --workdir runs/fedprox

What a run writes is what a centralised run writes (medjax/train.py): config.json, provenance, Orbax
checkpoints of the `FederatedState` at every checkpointed round (so `checkpoint.load(workdir)` gives the global
model, and a killed simulation resumes from its last round bit for bit: client selection, batches, dropout and
noise are functions of (seed, round, site)), metrics.jsonl and results.json, plus federated_report.md with the
per-site table and the spread across sites.

Sites come from the "sites" dataset (`medjax.data.datasets.sited`): the training data of site j is its split
"site{j}_train"; the global model is evaluated on the pooled eval split and, with `eval_sites`, on each site's
"site{j}_{eval split}" ("val_site{j}/..." metrics, and "val_sites/<metric>_{mean,std,min,max}" across sites).
At the end the test split (config.test_split) is evaluated the same way, and a held-out site's
"external_test" split when the dataset has one (the external-site evaluation).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging

from medjax import atomic, build, checkpoint, evaluators, provenance, sharding, steps
from medjax.data import pipeline
from medjax.federated import algorithms, options as fed_options, secure
from medjax.metric_writer import MetricWriter
from medjax.privacy import accounting

REPORT_FILE = "federated_report.md"
RESULTS_FILE = "results.json"
_SELECTION_STREAM = 0xFED


def training_sites(dataset) -> List[int]:
  """Indices j of the sites with a "site{j}_train" split (a held-out site has none)."""
  sites = sorted(int(s[4:-6]) for s in dataset.splits if s.startswith("site") and s.endswith("_train")
                 and s[4:-6].isdigit())
  if not sites:
    raise ValueError("config.federated: the dataset has no 'site{j}_train' splits; use config.data = "
                     "dict(name='sites', base=..., num_sites=...) (medjax.data.datasets.sited).")
  return sites


def site_arrays(dataset, sites: List[int], split: str = "train"):
  """Every training example of each site on the host, padded to the largest site:
  (images (S, capacity, *spatial, C) float32, labels (S, capacity, ...), counts (S,) int32)."""
  per_site = []
  for j in sites:
    source = dataset.source(f"site{j}_{split}")
    if len(source) == 0:
      raise ValueError(f"config.data: site {j} has no examples in its {split!r} split.")
    examples = [source[i] for i in range(len(source))]
    per_site.append((np.stack([e["image"] for e in examples]).astype(np.float32),
                     np.stack([np.asarray(e["label"]) for e in examples])))
  capacity = max(len(x) for x, _ in per_site)
  pad = lambda a: np.concatenate([a, np.zeros((capacity - len(a),) + a.shape[1:], a.dtype)])
  images = np.stack([pad(x) for x, _ in per_site])
  labels = np.stack([pad(y) for _, y in per_site])
  counts = np.asarray([len(x) for x, _ in per_site], np.int32)
  return images, labels, counts


def select_clients(seed: int, round_index: int, num_sites: int, per_round: Optional[int]) -> np.ndarray:
  """Positions (into the site list) of the clients of `round_index`, sorted; all of them without `per_round`."""
  if per_round is None or per_round >= num_sites:
    return np.arange(num_sites)
  rng = np.random.default_rng([seed, round_index, _SELECTION_STREAM])
  return np.sort(rng.choice(num_sites, size=per_round, replace=False))


def local_steps(options: Mapping[str, Any], counts: np.ndarray, batch_size: int) -> np.ndarray:
  """(S,) int32: each site's local steps per round."""
  if options["local_steps"] is not None:
    return np.full(len(counts), int(options["local_steps"]), np.int32)
  return np.ceil(float(options["local_epochs"]) * counts / batch_size).astype(np.int32)


def site_spread(per_site: Mapping[int, Mapping[str, float]]) -> Dict[str, float]:
  """Mean, standard deviation (ddof 0), min and max across sites of every metric all sites report, over the
  sites where it is defined (a site whose split holds one class has no AUC), with their count "<name>_sites"."""
  if not per_site:
    return {}
  names = set.intersection(*(set(m) for m in per_site.values()))
  out = {}
  for name in sorted(names):
    values = np.asarray([float(m[name]) for m in per_site.values()])
    values = values[np.isfinite(values)]
    if not len(values):
      continue
    out.update({f"{name}_mean": float(values.mean()), f"{name}_std": float(values.std()),
                f"{name}_min": float(values.min()), f"{name}_max": float(values.max()),
                f"{name}_sites": float(len(values))})
  return out


def sequential_client(*, apply_fn, objective, tx, algorithm: str, batch_size: int, proximal_mu: float,
                      client_lr: float, augment_fn=None, clip_norm=None, batch_constraint=None):
  """`client(variables, control, client_control, images, labels, count, num_steps, rng) -> ClientResult`, the
  same local training as `algorithms.client_update` run as a Python loop of one compiled local step (XLA:CPU runs
  a gradient pass inside `lax.scan` ~3x slower than outside a loop: benchmarks.md, Interpretability)."""
  start = jax.jit(functools.partial(algorithms.client_start, tx=tx, algorithm=algorithm, proximal_mu=proximal_mu))
  step = jax.jit(functools.partial(algorithms.client_step, apply_fn=apply_fn, objective=objective, tx=tx,
                                   algorithm=algorithm, batch_size=batch_size, proximal_mu=proximal_mu,
                                   augment_fn=augment_fn, batch_constraint=batch_constraint))
  finish = jax.jit(functools.partial(algorithms.client_finish, algorithm=algorithm, client_lr=client_lr,
                                     clip_norm=clip_norm))

  def client(variables, control, client_control, images, labels, count, num_steps, rng):
    global_params = variables["params"]
    state, batch_rng = start(variables, control, client_control, rng)
    loss_sum = jnp.zeros((), jnp.float32)
    for k in range(int(num_steps)):
      state, loss = step(state, global_params, control, client_control, images, labels, count, num_steps, batch_rng,
                         jnp.int32(k))
      loss_sum = loss_sum + loss
    return finish(state, global_params, control, num_steps, loss_sum)

  return client


def _client_dp(options, num_sites: int, per_round: int, rounds: int) -> Optional[Dict[str, Any]]:
  dp = options["client_dp"]
  if not dp:
    return None
  rate = per_round / num_sites
  delta = float(dp.get("delta", 1e-5))
  name = dp.get("accountant", "rdp")
  if "target_epsilon" in dp:
    sigma = accounting.noise_multiplier_for(float(dp["target_epsilon"]), rate, rounds, delta, accountant=name,
                                            key="config.federated.client_dp.target_epsilon")
  else:
    sigma = float(dp["noise_multiplier"])
  return dict(clip_norm=float(dp["clip_norm"]), noise_multiplier=sigma, delta=delta, accountant=name,
              sample_rate=rate, clients_per_round=per_round)


def run(config: mlc.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Simulates `config`'s federation in `workdir`, resuming from its newest intact round (module docstring).

  Returns the final pooled validation metrics, the test metrics ("test/...", per site "test_site{j}/..."),
  and "step" (rounds completed)."""
  started = time.perf_counter()
  build.validate(config)
  options = fed_options.parse(config.federated, config)
  checkpoint.check_config(workdir, config)
  settings = build.settings(config)
  rounds, batch_size, algorithm = int(config.total_steps), settings.batch_size, options["algorithm"]

  dataset = build.dataset(config)
  sites = training_sites(dataset)
  images, labels, counts = site_arrays(dataset, sites)
  if counts.min() < batch_size:
    small = sites[int(np.argmin(counts))]
    raise ValueError(f"config.input.batch_size = {batch_size} exceeds the {counts.min()} training examples of "
                     f"site {small}; lower the batch size or use fewer sites (config.data.num_sites).")
  num_sites = len(sites)
  if options["num_sites"] is not None and int(options["num_sites"]) != num_sites:
    raise ValueError(f"config.federated.num_sites = {options['num_sites']}, but config.data has {num_sites} "
                     f"training sites ({', '.join(f'site{j}_train' for j in sites)}); leave num_sites out in a "
                     "simulation.")
  per_round = min(int(options["clients_per_round"] or num_sites), num_sites)
  num_steps = local_steps(options, counts, batch_size)
  max_steps = int(num_steps.max())
  client_dp = _client_dp(options, num_sites, per_round, rounds)

  model, objective = build.model(config), build.objective(config)
  client_tx = build.optimizer(config)[0]
  server_tx = algorithms.server_optimizer(algorithm, server_lr=float(options["server_lr"]),
                                          beta1=float(options["server_beta1"]), beta2=float(options["server_beta2"]),
                                          tau=float(options["server_tau"]))
  evaluator = build.evaluator(config, dataset.info)
  mesh = build.mesh(config)

  init_fn = build.init_state_fn(model, client_tx, images[0, 0], use_ema=False)

  def init_state(key):
    fresh = init_fn(key)
    return algorithms.init_state(fresh.variables(), server_tx, fresh.rng, algorithm, num_sites)

  abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  for key, on in (("client_dp", client_dp), ("secure_aggregation", options["secure_aggregation"])):
    if on and "batch_stats" in abstract.model_state:
      raise ValueError(f"config.federated.{key}: model {config.model_name!r} uses BatchNorm, whose statistics "
                       "would leave the sites unprotected (and overflow the fixed-point sum); set "
                       "config.model.norm='group'.")
  ckpt = checkpoint.for_run(workdir, config)
  start_round = ckpt.latest_step() or 0
  if start_round:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)),
                          abstract)
    state = ckpt.restore(target, start_round)
    logging.info("Resumed the federated run from round %d.", start_round)
  else:
    state = jax.jit(init_state)(jax.random.PRNGKey(config.seed))
    pretrained = checkpoint.initial_variables(config, {"params": state.params, **state.model_state})
    if pretrained is not None:
      variables = dict(pretrained[0])
      state = state.replace(params=variables.pop("params"), model_state=variables,
                            server_opt_state=server_tx.init(pretrained[0]["params"]))
  if jax.process_index() == 0:
    checkpoint.record_config(workdir, config, step=start_round)
    provenance.write(workdir)

  local = dict(apply_fn=model.apply, objective=objective, tx=client_tx, algorithm=algorithm, batch_size=batch_size,
               proximal_mu=float(options["proximal_mu"]), client_lr=float(config.lr),
               augment_fn=build.augment_fn(config), clip_norm=client_dp["clip_norm"] if client_dp else None)
  if options["simulation"] == "vmap":
    client_fn = functools.partial(algorithms.client_update, max_steps=max_steps, **local)
    clients = jax.jit(jax.vmap(client_fn, in_axes=(None, None, 0, 0, 0, 0, 0, 0)))
  else:
    constrain = lambda b: jax.lax.with_sharding_constraint(b, sharding.batch_sharding(mesh))
    one_client = sequential_client(batch_constraint=constrain, **local)

    def clients(variables, control, client_controls, *per_client):
      results = [one_client(variables, control, None if client_controls is None else
                            jax.tree.map(lambda c: c[k], client_controls), *(a[k] for a in per_client))
                 for k in range(len(per_client[0]))]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *results)

  noise = client_dp["noise_multiplier"] * client_dp["clip_norm"] if client_dp else 0.0
  server_fn = jax.jit(functools.partial(algorithms.server_update, tx=server_tx, noise_stddev=noise,
                                        expected_weight=per_round if client_dp else None),
                      static_argnums=(2, 3))
  sums_fn = jax.jit(algorithms.weighted_sums)
  eval_step = jax.jit(functools.partial(steps.eval_step, apply_fn=build.eval_apply_fn(model, config),
                                        stats_fn=evaluator.stats_fn))
  eval_batch_size = build.eval_batch_size(config, mesh)

  def evaluate(state, split: str, prefix: str) -> Dict[str, float]:
    variables = {"params": state.params, **state.model_state}
    source = dataset.source(split)
    batches = pipeline.device_batches(pipeline.eval_batches(source, global_batch_size=eval_batch_size), mesh)
    metrics = evaluators.evaluate(evaluator, lambda b: eval_step(variables, b), batches)
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}

  def evaluate_sites(state, split: str, prefix: str) -> Dict[str, float]:
    pooled = evaluate(state, split, prefix)
    if not options["eval_sites"]:
      return pooled
    per_site = {j: evaluate(state, f"site{j}_{split}", f"{prefix}_site{j}") for j in sites
                if f"site{j}_{split}" in dataset.splits}
    stripped = {j: {k.split("/", 1)[1]: v for k, v in m.items()} for j, m in per_site.items()}
    spread = {f"{prefix}_sites/{k}": v for k, v in site_spread(stripped).items()}
    return {**pooled, **{k: v for m in per_site.values() for k, v in m.items()}, **spread}

  device_images, device_labels = jnp.asarray(images), jnp.asarray(labels)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  eval_every, ckpt_every = settings.eval_every_steps, settings.checkpoint_every_steps
  last_eval: Dict[str, float] = {}
  try:
    for r in range(start_round, rounds):
      t0 = time.perf_counter()
      chosen = select_clients(int(config.seed), r, num_sites, options["clients_per_round"])
      round_key = jax.random.fold_in(state.rng, r)
      keys = jax.vmap(lambda s: jax.random.fold_in(round_key, s))(jnp.asarray(chosen, jnp.int32) + 2)
      client_controls = (None if state.client_controls is None
                         else jax.tree.map(lambda c: c[chosen], state.client_controls))
      results = clients({"params": state.params, **state.model_state}, state.control, client_controls,
                        device_images[chosen], device_labels[chosen], jnp.asarray(counts[chosen]),
                        jnp.asarray(num_steps[chosen]), keys)
      weights = np.ones(len(chosen), np.float32) if client_dp else counts[chosen].astype(np.float32)
      if options["secure_aggregation"]:
        inputs, survivors = secure.secure_sums(results, weights, options["secure_aggregation"],
                                               seed=int(config.seed), round_index=r)
      else:
        inputs, survivors = sums_fn(results, jnp.asarray(weights)), np.arange(len(chosen))
      new_state = server_fn(state, inputs, len(survivors), num_sites)
      if state.client_controls is not None:
        kept = jax.tree.map(lambda d: d[survivors], results.control_delta)
        new_state = new_state.replace(client_controls=algorithms.scatter_controls(
            state.client_controls, jnp.asarray(chosen[survivors]), kept))
      state = new_state
      done = r + 1
      loss = float(np.mean(np.asarray(results.loss)[survivors]))
      scalars = {"train/loss": loss, "train/clients": float(len(survivors)),
                 "train/round_s": time.perf_counter() - t0}
      if client_dp:
        scalars["privacy/epsilon"] = accounting.epsilon(client_dp["noise_multiplier"], client_dp["sample_rate"],
                                                        done, client_dp["delta"], accountant=client_dp["accountant"])
      writer.write(done, scalars)
      logging.info("round %d/%d: loss %.4f over %d clients (%.1f s)", done, rounds, loss, len(survivors),
                   scalars["train/round_s"])
      do_eval = bool(eval_every) and (done % eval_every == 0 or done == rounds)
      if do_eval:
        last_eval = evaluate_sites(state, settings.eval_split, "val")
        writer.write(done, last_eval)
      if do_eval or (ckpt_every and done % ckpt_every == 0) or done == rounds:
        ckpt.save(done, state, metrics=last_eval if do_eval else None)
    ckpt.wait()
    if not last_eval:
      last_eval = evaluate_sites(state, settings.eval_split, "val")
    test = evaluate_sites(state, settings.test_split, "test") if settings.test_split else {}
    external = ({} if "external_test" not in dataset.splits
                else evaluate(state, "external_test", "external_test"))
    writer.write(int(state.step), {**test, **external})
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()

  results_doc = {"status": "finished", "step": int(state.step), "algorithm": algorithm, "sites": sites,
                 "site_train_examples": counts.tolist(), "local_steps": num_steps.tolist(),
                 "final": last_eval, "test": test, "external": external,
                 "wall_s": time.perf_counter() - started, "resumed_from_step": start_round}
  if client_dp:
    results_doc["privacy"] = dict(client_dp, rounds=int(state.step), epsilon=accounting.epsilon(
        client_dp["noise_multiplier"], client_dp["sample_rate"], int(state.step), client_dp["delta"],
        accountant=client_dp["accountant"]))
  if jax.process_index() == 0:
    atomic.write_text_atomically(os.path.join(workdir, RESULTS_FILE),
                                 json.dumps(_jsonable(results_doc), indent=2, sort_keys=True) + "\n")
    atomic.write_text_atomically(os.path.join(workdir, REPORT_FILE), report(results_doc))
    shown = {k: v for k, v in {**last_eval, **test}.items() if k.split("/", 1)[-1] in ("auc", "accuracy", "dice_mean")
             and "_site" not in k}
    print(f"Finished {int(state.step)}/{rounds} rounds of {algorithm} over sites {sites}: "
          + " ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items()))
          + f". Per-site table: {os.path.join(workdir, REPORT_FILE)}; results: {os.path.join(workdir, RESULTS_FILE)}.",
          flush=True)
  return {"step": int(state.step), **last_eval, **test, **external}


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (bool, str, int)) or value is None:
    return value
  value = float(value)
  return value if math.isfinite(value) else None


def report(results: Mapping[str, Any]) -> str:
  """federated_report.md: per-site test metrics, their spread across sites, pooled and external results."""
  lines = [f"# Federated run: {results['algorithm']}, {results['step']} rounds, sites {results['sites']}", ""]
  for section in ("test", "final"):
    metrics = results.get(section) or {}
    prefix = "test" if section == "test" else "val"
    names = sorted({k.split("/", 1)[1] for k in metrics if k.startswith(f"{prefix}/")
                    and isinstance(metrics[k], float)} & {"auc", "accuracy", "dice_mean", "loss", "mae"})
    if not names:
      continue
    lines += [f"## {prefix} split", "", "| site | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for j in results["sites"]:
      row = [metrics.get(f"{prefix}_site{j}/{n}") for n in names]
      if any(v is not None for v in row):
        lines.append(f"| {j} | " + " | ".join("" if v is None else f"{v:.4f}" for v in row) + " |")
    spread = [(metrics.get(f"{prefix}_sites/{n}_mean"), metrics.get(f"{prefix}_sites/{n}_std")) for n in names]
    if all(m is not None for m, _ in spread):
      lines.append("| mean ± sd over sites | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in spread) + " |")
    lines.append("| pooled | " + " | ".join(f"{metrics.get(f'{prefix}/{n}', float('nan')):.4f}" for n in names)
                 + " |")
    lines.append("")
  external = results.get("external") or {}
  if external:
    lines += ["## held-out site (external_test)", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in sorted(external.items()) if isinstance(v, float)]
  return "\n".join(lines) + "\n"
