"""The tools' error boundary (medjax.tools.cli): a user's mistake is one line on stderr and exit status 2, a bug
keeps its traceback; and each model or data tool answers its own bad arguments that way."""

import concurrent.futures
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from medjax import config_lib, models
from medjax.tools import benchmark, cli, plan, summary

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
MEDJAX_DIR = os.path.join(os.path.abspath(ROOT), "medjax")


def _raised(fn, *args):
  try:
    fn(*args)
  except Exception as e:  # the error itself, with its traceback
    return e
  raise AssertionError(f"{fn} raised nothing")


def _medjax_function(source: str, name: str):
  """A function compiled as if it lived in a medjax module: the boundary looks at where an error was raised."""
  namespace = {}
  exec(compile(source, os.path.join(MEDJAX_DIR, "fake_module.py"), "exec"), namespace)
  return namespace[name]


def _error_line(capsys, prog: str) -> str:
  """The message of the one line the tool wrote to stderr."""
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
  return lines[0][len(f"{prog}: error: "):]


def test_user_errors_are_the_ones_medjax_raises_on_purpose(tmp_path):
  # Raised by medjax's own `raise` statements: a registry's unknown name, a model keyword, a config key.
  assert cli.is_user_error(_raised(models.MODELS.get, "unte"))
  assert cli.is_user_error(_raised(models.MODELS.build, "unet", {"featurs": (4,)}))
  assert cli.is_user_error(_raised(config_lib.parse_kwargs, "features"))
  assert cli.is_user_error(cli.UsageError("--roi takes integers"))  # whoever raised it
  assert cli.is_user_error(_raised(open, str(tmp_path / "missing.nii.gz")))  # a path the user gave
  raise_value_error = _medjax_function("def f():\n  raise ValueError('bad value')\n", "f")
  assert cli.is_user_error(_raised(raise_value_error))
  # Bugs: a dict lookup or a builtin in medjax code, errors out of NumPy or JAX, any TypeError.
  assert not cli.is_user_error(_raised(_medjax_function("def f():\n  return {}['k']\n", "f")))
  assert not cli.is_user_error(_raised(_medjax_function("def f():\n  return int('x')\n", "f")))
  assert not cli.is_user_error(_raised(np.reshape, np.ones(3), 5))
  assert not cli.is_user_error(_raised(jnp.split, jnp.ones(4), 3))  # a ValueError out of JAX
  assert not cli.is_user_error(_raised(jnp.add, jnp.ones(3), jnp.ones(4)))
  assert not cli.is_user_error(_raised(lambda: {}["k"]))  # outside medjax


def test_error_message_is_one_line():
  assert cli.error_message(KeyError("Unknown model 'x'.")) == "Unknown model 'x'."  # no KeyError quotes
  assert cli.error_message(FileNotFoundError(2, "No such file or directory", "runs/x")) == (
      "runs/x: No such file or directory")
  assert cli.error_message(ValueError("first line\n  second line\n")) == "first line second line"


def _toy_tool():
  fv = flags.FlagValues()
  flags.DEFINE_string("name", None, "A name.", required=True, flag_values=fv)
  flags.DEFINE_integer("count", 1, "A count.", lower_bound=1, flag_values=fv)

  def main(argv):
    del argv
    if fv.name == "bug":
      return None + 1  # a programming error: must keep its traceback
    if fv.name == "missing":
      return open(os.path.join("/nonexistent", "case.nii.gz"))
    models.MODELS.get(fv.name)
    return fv.count
  return main, fv


def test_call_answers_mistakes_in_one_line_and_keeps_bugs(capsys):
  main, fv = _toy_tool()
  prog = "tests.tools.test_cli"
  assert cli.call(main, fv, ["toy", "--name=unet", "--count=3"]) == 3
  assert cli.call(main, fv, ["toy", "--name=unet"]) == 1  # a second parse starts from the defaults
  cases = [(["toy"], "--name is required (pass --help to list the flags)"),
           (["toy", "--name=unet", "--count=0"], "flag --count=0: 0 is not a positive integer (pass --help"),
           (["toy", "--name=unet", "--cuont=2"], "Unknown command line flag 'cuont'. Did you mean: count ?"),
           (["toy", "--name=unte"], "Unknown model 'unte'. Did you mean 'unet' or 'unetr'? Known model names: "),
           (["toy", "--name=missing"], "/nonexistent/case.nii.gz: No such file or directory")]
  for argv, expected in cases:
    with pytest.raises(SystemExit) as exit_info:
      cli.call(main, fv, argv)
    assert exit_info.value.code == 2, argv
    assert _error_line(capsys, prog).startswith(expected), argv
  with pytest.raises(TypeError):
    cli.call(main, fv, ["toy", "--name=bug"])


def test_program_name():
  assert cli.program_name(summary.main) == "medjax.tools.summary"


def test_numbers_name_the_flag():
  assert cli.numbers(["8", "12"], "roi") == (8, 12) and cli.numbers(None, "roi") is None
  assert cli.numbers(["0.5", "1"], "target_spacing", float, positive=True) == (0.5, 1.0)
  with pytest.raises(cli.UsageError, match=r"^--roi takes positive integers separated by commas, got '8,0'\.$"):
    cli.numbers(["8", "0"], "roi", positive=True)
  with pytest.raises(cli.UsageError, match="--input_shape takes integers separated by commas, got '8,x'"):
    cli.numbers(["8", "x"], "input_shape")


def test_check_workdir_names_the_path(tmp_path):
  (tmp_path / "demo").mkdir()
  (tmp_path / "demo" / "config.json").write_text("{}")
  (tmp_path / "empty").mkdir()
  (tmp_path / "file").write_text("")
  assert cli.check_workdir(str(tmp_path / "demo")) == str(tmp_path / "demo")
  with pytest.raises(cli.UsageError, match=rf"^--workdir {tmp_path}/dmeo does not exist\. Did you mean 'demo'\?$"):
    cli.check_workdir(str(tmp_path / "dmeo"))
  with pytest.raises(cli.UsageError, match=rf"^--workdir {tmp_path}/empty is empty: no run was written there"):
    cli.check_workdir(str(tmp_path / "empty"))
  with pytest.raises(cli.UsageError, match=rf"^--workdir {tmp_path}/file is a file, not a run directory\.$"):
    cli.check_workdir(str(tmp_path / "file"))


def _tool_error(capsys, tool, argv) -> str:
  """The one-line error of `tool`'s command line `argv`, run in this process (plan's `main` takes argv itself)."""
  with pytest.raises(SystemExit) as exit_info:
    plan.main(argv) if tool is plan else cli.call(tool.main, tool._FLAGS, argv)
  assert exit_info.value.code == 2
  return _error_line(capsys, tool.__name__)


UNET = "spatial_dims=3,num_classes=2,features=(4,8)"


def test_summary_and_benchmark_mistakes(capsys):
  assert _tool_error(capsys, summary, ["summary", "--model=unte", "--input_shape=8,8,8,1"]).startswith(
      "Unknown model 'unte'. Did you mean 'unet' or 'unetr'? Known model names: attention_unet, ")
  assert _tool_error(capsys, summary, ["summary", "--model=unet", f"--kwargs={UNET},featurs=2",
                                       "--input_shape=8,8,8,1"]).startswith(
      "--kwargs: unknown key 'featurs' for model 'unet'. Did you mean 'features'")
  assert _tool_error(capsys, summary, ["summary", "--model=unet", f"--kwargs={UNET}", "--input_shape=8,8,1"]) == (
      "UNet(spatial_dims=3) expects input (B, z, y, x, C) (channels-last), got shape (1, 8, 8, 1).")
  assert _tool_error(capsys, summary, ["summary", "--model=unet", f"--kwargs={UNET}", "--input_shape=8,x,8,1"]) == (
      "--input_shape takes positive integers separated by commas, got '8,x,8,1'.")
  assert _tool_error(capsys, summary, ["summary", "--model=unet"]) == (
      "--input_shape is required (pass --help to list the flags)")
  args = ["benchmark", "--model=unet", f"--kwargs={UNET}", "--input_shape=8,8,8,1", "--steps=1", "--warmup=0"]
  assert _tool_error(capsys, benchmark, args + ["--modes=trian"]) == (
      "--modes: unknown mode 'trian'; the modes are forward, train, augment. Did you mean 'train'?")
  assert _tool_error(capsys, benchmark, args + ["--modes=augment"]) == (
      "The augment mode needs an augmentation config (--augment).")
  assert _tool_error(capsys, benchmark, args + ["--batch_size=3"]).startswith(  # 8 devices in the tests
      "--batch_size=3 is not divisible")


def test_plan_mistakes(capsys, tmp_path):
  out = f"--out={tmp_path}"
  assert _tool_error(capsys, plan, ["plan", "--dataset=synthetic_phantom", out]).startswith(
      "Unknown dataset 'synthetic_phantom'. Did you mean 'synthetic_phantoms' or 'synthetic_lesions'")
  assert _tool_error(capsys, plan, ["plan", "--dataset=synthetic_phantoms", "--kwargs=image_size=8,num_train=2",
                                    "--split=trian", out]) == (
      "--split: the dataset has no split 'trian'; it has 'train', 'val', 'test'. Did you mean 'train'?")
  assert _tool_error(capsys, plan, ["plan", "--dataset=synthetic_phantoms"]) == (
      "--out is required (pass --help to list the flags)")
  assert not list(tmp_path.iterdir())


def test_each_tool_fails_in_one_line_from_the_command_line(tmp_path):
  """`python -m medjax.tools.X` with a mistake: exit status 2 and exactly one line on stderr, naming it. The
  six start in parallel (most of each is importing JAX)."""
  env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  (tmp_path / "runs" / "demo").mkdir(parents=True)
  missing = tmp_path / "runs" / "dmeo"
  cases = {
      "evaluate": ([f"--workdir={missing}"], f"--workdir {missing} does not exist. Did you mean 'demo'?"),
      "predict": ([f"--workdir={missing}", f"--output={tmp_path}"], "predict needs --input (or --benchmark)."),
      "summary": (["--model=unte", "--input_shape=8,8,1"], "Unknown model 'unte'. Did you mean 'unet' or 'unetr'?"),
      "benchmark": (["--model=unet", "--input_shape=8,8,8,1", "--modes=trian"], "--modes: unknown mode 'trian';"),
      "plan": (["--dataset=synthetic_phantom", f"--out={tmp_path}"], "Unknown dataset 'synthetic_phantom'."),
      "export": ([f"--workdir={missing}", f"--out={tmp_path}/m"], f"--workdir {missing} does not exist. Did you mean "
                 "'demo'?"),
  }

  def launch(tool):
    return subprocess.run([sys.executable, "-m", f"medjax.tools.{tool}"] + cases[tool][0], capture_output=True,
                          text=True, env=env, timeout=120, check=False)

  with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    results = dict(zip(cases, pool.map(launch, cases)))
  for tool, result in results.items():
    assert result.returncode == 2, (tool, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"medjax.tools.{tool}: error: {cases[tool][1]}"), (tool, lines)
    assert result.stdout == ""
