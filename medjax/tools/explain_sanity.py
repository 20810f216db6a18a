"""The sanity checks of `medjax.tools.explain --sanity`, on the cases it explains (medjax.interpret.sanity).

  cascading randomisation  the weights re-initialised from the head down, group by group (the model's own
                           initialisers); Spearman rank correlation of each stage's maps with the trained model's
  deletion / insertion     AUCs of the method's maps and of uniform random maps (Petsiuk et al. 2018): deletion sets
                           the most salient pixels to 0 (the normalised image's mid-grey) first, insertion reveals
                           them on a blurred copy first; the score is the explained class's softmax probability
  random labels            with a run of the same model trained on permuted labels (Adebayo et al.'s data
                           randomisation test): Spearman correlation of its maps with this run's, same cases and
                           classes
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from medjax import checkpoint
from medjax.interpret import methods, sanity


def blur_sigma(spatial) -> float:
  """The insertion baseline's blur in voxels: RISE's sigma 5 at 224 px, scaled down for small images (at least 1)."""
  return float(min(5.0, max(1.0, min(spatial) / 16)))


def _stats(values) -> Dict[str, float]:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}


def checks(name: str, model: Any, variables: Any, images: jax.Array, target: Any, maps: np.ndarray,
           options: Dict[str, Any], *, n: int, seed: int = 0, random_labels_workdir: Optional[str] = None,
           which: str = "best") -> dict:
  """The sanity results of method `name` on the first `n` examples of `images` `(B, *spatial, C)` (the maps of the
  trained model `maps` `(n, *spatial)` already computed). JSON-ready dict: "cascade", "deletion", "insertion",
  and "random_labels" when `random_labels_workdir` is given."""
  images = jnp.asarray(images)[:n]
  if isinstance(target, (jax.Array, np.ndarray)):
    target = jnp.asarray(target)[:n]
  else:  # a RegionTarget
    target = type(target)(jnp.asarray(target.mask)[:n], target.class_index)
  method = lambda m, v, x, t, **o: methods.explain(name, m, v, x, t, **o)
  cascade = sanity.cascading_randomization(method, model, variables, images, target,
                                           rng=jax.random.key(seed), **options)
  result = {"cascade": {"stages": list(cascade.stages), "spearman": cascade.spearman.tolist(),
                        "spearman_abs": cascade.spearman_abs.tolist()}}
  random = np.asarray(sanity.random_map(jax.random.key(seed + 1), maps))
  spatial = images.shape[1:-1]
  for mode, baseline in (("deletion", "zero"), ("insertion", "blur")):
    aucs = {}
    for label, attribution in (("method", maps), ("random", random)):
      _, auc = sanity.deletion_insertion(model, variables, images, target, jnp.asarray(attribution), mode=mode,
                                         baseline=baseline, blur_sigma=blur_sigma(spatial))
      aucs[label] = np.asarray(auc)
    better = aucs["method"] < aucs["random"] if mode == "deletion" else aucs["method"] > aucs["random"]
    result[mode] = {"baseline": baseline, "method_auc": _stats(aucs["method"]), "random_auc": _stats(aucs["random"]),
                    "cases_better_than_random": int(better.sum())}
  if random_labels_workdir:
    other = checkpoint.load(random_labels_workdir, step=str(which))
    other_maps = methods.explain(name, other.model, other.variables, images, target, **options)
    result["random_labels"] = {"workdir": str(random_labels_workdir), **sanity.compare_maps(maps, other_maps)}
  return result


def markdown(result: dict) -> List[str]:
  """Markdown lines of `checks`' result."""
  cascade = result["cascade"]
  lines = ["## Sanity checks", "", "Cascading randomisation (Adebayo et al. 2018): weights re-initialised from the "
           "head down; Spearman correlation with the trained model's maps (1 = unchanged).", "",
           "| randomised down to | Spearman | Spearman of abs |", "|---|---|---|"]
  lines += [f"| {stage} | {rho:.3f} | {rho_abs:.3f} |"
            for stage, rho, rho_abs in zip(cascade["stages"], cascade["spearman"], cascade["spearman_abs"])]
  lines += ["", "| curve (Petsiuk et al. 2018) | baseline | method AUC | random map AUC | cases better |",
            "|---|---|---|---|---|"]
  for mode in ("deletion", "insertion"):
    entry = result[mode]
    m, r = entry["method_auc"], entry["random_auc"]
    lines.append(f"| {mode} ({'lower' if mode == 'deletion' else 'higher'} is better) | {entry['baseline']} | "
                 f"{m['mean']:.3f} ± {m['std']:.3f} | {r['mean']:.3f} ± {r['std']:.3f} | "
                 f"{entry['cases_better_than_random']} of {m['n']} |")
  if "random_labels" in result:
    entry = result["random_labels"]
    lines += ["", f"Random labels (Adebayo et al.'s data randomisation): maps of `{entry['workdir']}` against this "
              f"run's: Spearman {entry['spearman']:.3f}, of abs {entry['spearman_abs']:.3f}."]
  return lines
