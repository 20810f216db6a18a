"""Model facts without allocating parameters: build from the registry, abstract variables, parameter counts
per block, output shapes, and FLOPs from XLA's cost analysis. Used by the summary and benchmark tools."""

from __future__ import annotations

import json
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp

from medjax import models


def build(model_name: str, kwargs: Dict[str, Any], dtype: str = "float32"):
  """The registered model with the compute dtype set (parameters float32). An unknown name is a KeyError with
  did-you-mean, a keyword the model does not take a ValueError naming `--kwargs` (where the tools take them)."""
  return models.MODELS.build(model_name, {**kwargs, "dtype": jnp.dtype(dtype)}, where="--kwargs")


def abstract_variables(model, input_shape: Sequence[int], batch_size: int = 1):
  """Shapes of the model's variables for an input of `(batch_size, *input_shape)`, without allocating."""
  x = jax.ShapeDtypeStruct((batch_size,) + tuple(input_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0, impl="rbg"),
                                              "dropout": jax.random.key(1, impl="rbg")}, x, train=False), x)


def forward_flops(model, variables, input_shape: Sequence[int], batch_size: int) -> float:
  """FLOPs of one inference forward pass from XLA's cost analysis (NaN if the backend gives none)."""
  x = jax.ShapeDtypeStruct((batch_size,) + tuple(input_shape), jnp.float32)
  return compiled_flops(jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile())


def compiled_flops(compiled) -> float:
  """FLOPs of a compiled XLA program from its cost analysis (NaN if the backend gives none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per device program
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def count(tree) -> int:
  return int(sum(leaf.size for leaf in jax.tree.leaves(tree)))


def summarize(model_name: str, kwargs: Dict[str, Any], input_shape: Sequence[int], batch_size: int = 1,
              dtype: str = "float32") -> Dict[str, Any]:
  """Parameters in all and per top-level block, output and aux shapes, forward GFLOPs per batch."""
  model = build(model_name, kwargs, dtype)
  variables = abstract_variables(model, input_shape, batch_size)
  x = jax.ShapeDtypeStruct((batch_size,) + tuple(input_shape), jnp.float32)
  outputs, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  shapes = lambda tree: jax.tree.map(lambda a: list(a.shape), tree)
  return {
      "model": model_name, "kwargs": kwargs, "input_shape": [batch_size] + list(input_shape),
      "parameters": count(variables["params"]),
      "parameters_per_block": {name: count(block) for name, block in variables["params"].items()},
      "other_collections": {name: count(tree) for name, tree in variables.items() if name != "params"},
      "output_shape": shapes(outputs), "aux_shapes": shapes(aux),
      "forward_gflops": forward_flops(model, variables, input_shape, batch_size) / 1e9,
  }


def format_table(summary: Dict[str, Any]) -> str:
  lines = [f"{summary['model']} {summary['kwargs']} input {tuple(summary['input_shape'])}",
           f"{'block':<32}{'parameters':>14}"]
  lines += [f"{name:<32}{n:>14,}" for name, n in summary["parameters_per_block"].items()]
  lines += [f"{'total':<32}{summary['parameters']:>14,}",
            f"output {summary['output_shape']}", f"aux {json.dumps(summary['aux_shapes'])}",
            f"forward GFLOPs per batch: {summary['forward_gflops']:.3f}"]
  return "\n".join(lines)
