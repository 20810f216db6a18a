"""Times a registered model's forward pass and train step on the current backend.

  python -m medjax.tools.benchmark --model unet --kwargs "spatial_dims=3,num_classes=3" \
      --input_shape 128,128,128,1 --batch_size 2 --dtype bfloat16 --json_out bench.json

Prints one JSON object per mode: compile seconds, median step milliseconds over `--steps` timed steps
(after `--warmup`), samples/s, FLOP/s from XLA's cost analysis, and peak device memory where the backend
reports it. The train step is medjax's own (`steps.train_step` under `jax.jit` with the state donated,
Adam), with Dice+CE on random labels for dense outputs and cross-entropy for class logits. Random inputs
are generated on the device, so host transfer is not timed. A user's mistake (an unknown model or mode, a
batch the devices do not divide, a malformed shape) prints one line `medjax.tools.benchmark: error: ...` and
exits with status 2.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from medjax import augment, build, config_lib, losses, sharding
from medjax.tools import cli, model_info

MODES = ("forward", "train", "augment")

_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_MODEL = flags.DEFINE_string("model", None, "Registered model name.", required=True, flag_values=_FLAGS)
_KWARGS = flags.DEFINE_string("kwargs", "", "Model keyword arguments: k=v,k2=v2 (Python literals).",
                              flag_values=_FLAGS)
_INPUT_SHAPE = flags.DEFINE_list("input_shape", None, "Input shape without batch: spatial..., channels.",
                                 required=True, flag_values=_FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 2, "Global batch size (split over all local devices).", lower_bound=1,
                              flag_values=_FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).",
                           flag_values=_FLAGS)
_MODES = flags.DEFINE_list("modes", ["forward", "train"], "Which of forward, train, augment (the chain alone) to "
                           "time.", flag_values=_FLAGS)
_AUGMENT = flags.DEFINE_bool("augment", False, "Run augment.SEGMENTATION_CHAIN inside the train step "
                             "(and in the augment mode).", flag_values=_FLAGS)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (the median is reported).", lower_bound=1, flag_values=_FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.", lower_bound=0, flag_values=_FLAGS)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the results to this JSON file.", flag_values=_FLAGS)


def _time_calls(call, steps: int, warmup: int) -> Sequence[float]:
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def _peak_memory_bytes() -> Any:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _result(mode: str, compile_s: float, times: Sequence[float], batch_size: int, flops: float) -> Dict[str, Any]:
  median = statistics.median(times)
  return {"mode": mode, "compile_s": compile_s, "median_ms": median * 1e3, "samples_per_s": batch_size / median,
          "tflops_per_s": flops / median / 1e12, "peak_memory_bytes": _peak_memory_bytes(),
          "steps_timed": len(times)}


def benchmark(model_name: str, kwargs: Dict[str, Any], input_shape: Sequence[int], batch_size: int,
              dtype: str = "float32", modes: Sequence[str] = ("forward", "train"), steps: int = 20,
              warmup: int = 3, augment_config: Dict[str, Any] | None = None) -> Dict[str, Any]:
  """Times the modes; returns {"model", "device", ..., "results": [per-mode dicts]}. Raises ValueError for an
  unknown mode, a batch the devices do not divide, or an input shape of another rank than the model's."""
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    raise ValueError(f"--modes: unknown mode {unknown[0]!r}; the modes are {', '.join(MODES)}."
                     f"{config_lib.suggest(unknown[0], MODES)}")
  if "augment" in modes and not augment_config:  # before anything is compiled or timed
    raise ValueError("The augment mode needs an augmentation config (--augment).")
  model = model_info.build(model_name, kwargs, dtype)
  mesh = sharding.make_mesh(build.DEFAULT_MESH)
  sharding.check_batch_size(batch_size, mesh, what="--batch_size")
  batch_sharding = sharding.batch_sharding(mesh)
  image = jax.jit(lambda key: jax.random.normal(key, (batch_size,) + tuple(input_shape)),
                  out_shardings=batch_sharding)(jax.random.PRNGKey(0))
  tx = optax.adam(1e-4)
  init_fn = build.init_state_fn(model, tx, np.zeros(tuple(input_shape), np.float32), use_ema=False)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_sharding = sharding.state_shardings(abstract, mesh, "data_parallel")
  state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(0))
  augment_fn = augment.make_augment(augment_config) if augment_config else None
  report = {"model": model_name, "kwargs": kwargs, "input_shape": [batch_size] + list(input_shape),
            "augment": augment_config or {}, "dtype": dtype, "device": str(jax.devices()[0].device_kind),
            "device_count": jax.device_count(),
            "results": []}

  if "forward" in modes:
    forward = jax.jit(lambda variables, x: model.apply(variables, x, train=False)[0])
    variables = state.variables()
    start = time.perf_counter()
    compiled = forward.lower(variables, image).compile()
    compile_s = time.perf_counter() - start
    times = _time_calls(lambda: compiled(variables, image), steps, warmup)
    report["results"].append(_result("forward", compile_s, times, batch_size, model_info.compiled_flops(compiled)))

  if "train" in modes:
    out_shape = jax.eval_shape(lambda v, x: model.apply(v, x, train=False)[0], state.variables(), image).shape
    dense = len(out_shape) == len(input_shape) + 1
    label_shape = out_shape[:-1]
    labels = jax.jit(lambda key: jax.random.randint(key, label_shape, 0, out_shape[-1]),
                     out_shardings=batch_sharding)(jax.random.PRNGKey(1))
    objective = losses.make_objective("dice_xent" if dense else "xent", {})
    step = build.jit_train_step(model, objective, tx, mesh, state_sharding, augment_fn=augment_fn)
    batch = {"image": image, "label": labels}
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def call():
      holder["state"], metrics = compiled(holder["state"], batch)
      return metrics["loss"]

    times = _time_calls(call, steps, warmup)
    report["results"].append(_result("train", compile_s, times, batch_size, model_info.compiled_flops(compiled)))

  if "augment" in modes:
    out_shape = jax.eval_shape(lambda v, x: model.apply(v, x, train=False)[0], state.variables(), image).shape
    labels = jnp.zeros(out_shape[:-1], jnp.int32)
    chain = jax.jit(augment_fn)
    key = jax.random.PRNGKey(2)
    batch = {"image": image, "label": labels}
    start = time.perf_counter()
    compiled = chain.lower(key, batch).compile()
    compile_s = time.perf_counter() - start
    times = _time_calls(lambda: compiled(key, batch)["image"], steps, warmup)
    report["results"].append(_result("augment", compile_s, times, batch_size, model_info.compiled_flops(compiled)))
  return report


def main(argv):
  del argv
  report = benchmark(_MODEL.value, config_lib.parse_kwargs(_KWARGS.value),
                     cli.numbers(_INPUT_SHAPE.value, "input_shape", positive=True),
                     _BATCH.value, _DTYPE.value, _MODES.value, _STEPS.value, _WARMUP.value,
                     augment.SEGMENTATION_CHAIN if _AUGMENT.value else None)
  text = json.dumps(report, indent=2)
  print(text)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  cli.run(main, _FLAGS)  # a user's mistake: one line on stderr, exit status 2 (tools/cli.py)
