"""Model summary: parameters per block, output shapes and FLOPs for any registered model.

  python -m medjax.tools.summary --model unet --kwargs "spatial_dims=3,num_classes=3" --input_shape 64,64,64,1
  python -m medjax.tools.summary --model resnet50 --kwargs "num_classes=1000" --input_shape 224,224,3

Nothing is allocated for the parameters: shapes come from `jax.eval_shape`, FLOPs from XLA's cost analysis
of the compiled forward pass (batch 1 unless `--batch_size`).
"""

from __future__ import annotations

import json

from absl import app, flags

from medjax import config_lib
from medjax.tools import model_info

_MODEL = flags.DEFINE_string("model", None, "Registered model name.", required=True)
_KWARGS = flags.DEFINE_string("kwargs", "", "Model keyword arguments: k=v,k2=v2 (Python literals).")
_INPUT_SHAPE = flags.DEFINE_list("input_shape", None, "Input shape without batch: spatial..., channels.",
                                 required=True)
_BATCH = flags.DEFINE_integer("batch_size", 1, "Batch size for shapes and FLOPs.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")


def main(argv):
  del argv
  summary = model_info.summarize(_MODEL.value, config_lib.parse_kwargs(_KWARGS.value),
                                 [int(s) for s in _INPUT_SHAPE.value], _BATCH.value, _DTYPE.value)
  print(json.dumps(summary, indent=2) if _JSON.value else model_info.format_table(summary))


if __name__ == "__main__":
  app.run(main)
