"""Model summary: parameters per block, output shapes and FLOPs for any registered model.

  python -m medjax.tools.summary --model unet --kwargs "spatial_dims=3,num_classes=3" --input_shape 64,64,64,1
  python -m medjax.tools.summary --model resnet50 --kwargs "num_classes=1000" --input_shape 224,224,3

Nothing is allocated for the parameters: shapes come from `jax.eval_shape`, FLOPs from XLA's cost analysis
of the compiled forward pass (batch 1 unless `--batch_size`). A user's mistake (an unknown model, a keyword
it does not take, a malformed shape) prints one line `medjax.tools.summary: error: ...` and exits with
status 2.
"""

from __future__ import annotations

import json

from absl import flags

from medjax import config_lib
from medjax.tools import cli, model_info

_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_MODEL = flags.DEFINE_string("model", None, "Registered model name.", required=True, flag_values=_FLAGS)
_KWARGS = flags.DEFINE_string("kwargs", "", "Model keyword arguments: k=v,k2=v2 (Python literals).",
                              flag_values=_FLAGS)
_INPUT_SHAPE = flags.DEFINE_list("input_shape", None, "Input shape without batch: spatial..., channels.",
                                 required=True, flag_values=_FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 1, "Batch size for shapes and FLOPs.", lower_bound=1, flag_values=_FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.", flag_values=_FLAGS)
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.", flag_values=_FLAGS)


def main(argv):
  del argv
  summary = model_info.summarize(_MODEL.value, config_lib.parse_kwargs(_KWARGS.value),
                                 cli.numbers(_INPUT_SHAPE.value, "input_shape", positive=True), _BATCH.value,
                                 _DTYPE.value)
  print(json.dumps(summary, indent=2) if _JSON.value else model_info.format_table(summary))


if __name__ == "__main__":
  cli.run(main, _FLAGS)  # a user's mistake: one line on stderr, exit status 2 (tools/cli.py)
