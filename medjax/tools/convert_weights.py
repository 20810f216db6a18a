"""Convert a PyTorch weight file to medjax names, or medjax weights back to a PyTorch state dict.

  python -m medjax.tools.convert_weights --input resnet18-f37072fd.pth --model resnet18 \\
      --output resnet18.safetensors                                   # torchvision -> medjax names
  python -m medjax.tools.convert_weights --input swin_unetr.pt --source monai --model swin_unetr \\
      --kwargs "img_size=96,feature_size=48" --output swin_unetr.safetensors
  python -m medjax.tools.convert_weights --input runs/pretrain --model resnet18 --to torch \\
      --output resnet18_medical.pth                                    # a run's best step -> torchvision

The medjax-named file (`params/stem_conv/kernel`, ...) is what `config.init_from.path` loads without torch
(`source="auto"` recognises the names), so a machine that trains needs no torch. `--input` may also be a
workdir (its best step, `--step` to choose); a self-supervised pretraining run gives its encoder
(`checkpoint.model_weights`), e.g. `--input runs/ssl/simclr_r18 --model resnet18 --to torch`. `--to torch`
writes the `--source` layout (.pt/.pth need torch; .safetensors and .npz do not). A file that does not fit the
model is one error listing every missing, unexpected and mis-shaped tensor; any user's mistake prints one line
`medjax.tools.convert_weights: error: ...` and exits with status 2.
"""

from __future__ import annotations

import os

from absl import flags

from medjax import checkpoint, config_lib, transfer
from medjax.tools import cli

_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_INPUT = flags.DEFINE_string("input", None, "A weight file (.safetensors, .npz, .pt, .pth) or a medjax workdir.",
                             required=True, flag_values=_FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "The file to write (its suffix picks the format).", required=True,
                              flag_values=_FLAGS)
_MODEL = flags.DEFINE_string("model", None, "The medjax model name (see transfer.supported()).", required=True,
                             flag_values=_FLAGS)
_KWARGS = flags.DEFINE_string("kwargs", "", "The model's keyword arguments: k=v,k2=v2 (Python literals).",
                              flag_values=_FLAGS)
_SOURCE = flags.DEFINE_enum("source", "torchvision", ["torchvision", "timm", "monai"],
                            "The PyTorch layout read or written.", flag_values=_FLAGS)
_TO = flags.DEFINE_enum("to", "medjax", ["medjax", "torch"], "Write medjax names, or the --source layout.",
                        flag_values=_FLAGS)
_STEP = flags.DEFINE_string("step", "best", "A workdir's step: best, latest or a number.", flag_values=_FLAGS)


def _read_medjax(path: str, step: str):
  """Medjax variables from a workdir (its `step`) or a medjax-named file."""
  if os.path.isdir(path):
    return checkpoint.model_weights(path, int(step) if step.isdigit() else step)[0]
  state_dict = transfer.load_state_dict(path)
  if not all("/" in name for name in state_dict):
    raise cli.UsageError(f"{path}: holds PyTorch names, not medjax ones; convert it with --to medjax first")
  return transfer.unflatten({tuple(name.split("/")): value for name, value in state_dict.items()})


def convert(input_path: str, output_path: str, model_name: str, model_kwargs: dict, source: str, to: str,
            step: str = "best") -> int:
  """Converts and writes; returns the number of tensors written."""
  if to == "medjax":
    if os.path.isdir(input_path):
      variables = _read_medjax(input_path, step)
    else:
      variables = transfer.from_torch(transfer.load_state_dict(input_path), model_name, model_kwargs, source=source)
    out = {"/".join(path): value for path, value in transfer.flatten(variables).items()}
  else:
    out = transfer.to_torch(_read_medjax(input_path, step), model_name, model_kwargs, source=source)
  transfer.save_state_dict(output_path, out)
  return len(out)


def main(argv):
  del argv
  n = convert(_INPUT.value, _OUTPUT.value, _MODEL.value, config_lib.parse_kwargs(_KWARGS.value), _SOURCE.value,
              _TO.value, _STEP.value)
  print(f"{_OUTPUT.value}: {n} tensors ({'medjax names' if _TO.value == 'medjax' else _SOURCE.value})")


if __name__ == "__main__":
  cli.run(main, _FLAGS)  # a user's mistake: one line on stderr, exit status 2 (tools/cli.py)
