"""experiments/medmnist_resnet.py: the official protocol's numbers, argument errors, validation of every
choice, and train.main for a few steps on small fake .npz files of the official layout (never the real
ones)."""

import json
import math
import os

import numpy as np
import pytest

import medjax.models.acs  # noqa: F401  registers resnet*_acs / resnet*_2.5d (until models/__init__ imports it)
from medjax import build, config_lib, train
from medjax.data.datasets import medmnist as mm

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "medmnist_resnet.py")
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _load(arg=""):
  return config_lib.load_config(f"{EXPERIMENT}:{arg}")


def _module():
  import importlib.util
  spec = importlib.util.spec_from_file_location("medmnist_resnet_experiment", EXPERIMENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_static_subset_table_matches_the_dataset_table():
  table = _module().SUBSETS
  assert set(table) == set(mm.SUBSETS) - {"chestmnist"}
  for name, (dims, classes, train_size) in table.items():
    info = mm.SUBSETS[name]
    assert (dims, classes, train_size) == (info.spatial_dims, len(info.class_names), info.split_sizes[0])


def test_official_protocol_2d():
  c = _load()
  assert (c.data.subset, c.data.size, c.data.channels, c.data.verify_md5) == ("breastmnist", 28, 3, True)
  assert c.data.data_dir == os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "medmnist"))
  assert c.input.batch_size == 128
  assert c.total_steps == 100 * 5 and c.eval_every_steps == 5  # ceil(546 / 128) = 5 steps per epoch
  assert c.model_name == "resnet18" and c.model.to_dict() == dict(num_classes=2, spatial_dims=2,
                                                                   small_input=True)
  assert c.optim.to_dict() == dict(name="adam", wd=0.0) and c.lr == 1e-3
  assert c.schedule.to_dict() == dict(decay="step", boundaries=(0.5, 0.75), factor=0.1)
  assert c.loss.to_dict() == dict(name="xent", label_smoothing=0.0) and c.ema_decay == 0.0
  assert "augment" not in c and c.grad_clip_norm is None
  assert (c.best_metric, c.best_mode, c.test_split) == ("val/auc", "max", "test")
  assert c.tags.to_dict() == dict(experiment="medmnist_resnet", subset="breastmnist", model="resnet18",
                                  conv="2d", size=28, recipe="official", epochs=100, steps_per_epoch=5,
                                  quick=False)


@pytest.mark.parametrize("conv,model_name", [("auto", "resnet50"), ("3d", "resnet50"), ("acs", "resnet50_acs"),
                                             ("2.5d", "resnet50_2.5d")])
def test_official_protocol_3d_conv_choices(conv, model_name):
  c = _load(f"subset=adrenalmnist3d,model=resnet50,conv={conv},size=64,seed=2,data_dir=/data/mm")
  assert c.model_name == model_name and c.model.spatial_dims == 3 and c.tags.conv == conv.replace("auto", "3d")
  assert c.input.batch_size == 32 and c.total_steps == 100 * math.ceil(1188 / 32)
  assert (c.data.channels, c.data.size, c.data.data_dir, c.seed) == (1, 64, "/data/mm", 2)


def test_improved_recipe():
  c = _load("subset=pneumoniamnist,recipe=improved")
  spe = math.ceil(4708 / 128)
  assert c.optim.name == "adamw" and c.optim.wd > 0
  assert c.schedule.to_dict() == dict(decay="cosine", warmup_steps=5 * spe)
  assert c.loss.label_smoothing == 0.1 and c.ema_decay == 0.99
  assert c.augment.flip.axes == (-1,) and c.augment.affine.p > 0
  assert (c.total_steps, c.input.batch_size, c.best_metric, c.test_split) == (100 * spe, 128, "val/auc", "test")
  assert _load("recipe=improved").ema_decay == 0.99  # 5 steps per epoch: clamped
  assert "eval_flips" not in c and "tta" not in c.tags
  tta = _load("subset=adrenalmnist3d,recipe=improved,tta=true")
  assert tta.eval_flips == ((), (2,)) and tta.tags.tta is True  # (D, H, W): W is spatial axis 2
  assert "mixup" not in c.augment and "mixup" not in c.tags
  mixed = _load("recipe=improved,mixup=0.4")
  assert mixed.augment.mixup.to_dict() == dict(p=1.0, alpha=0.4) and mixed.augment.num_classes == 2
  assert mixed.tags.mixup == 0.4
  assert "sampler" not in c.input and "balance" not in c.tags
  balanced = _load("recipe=improved,balance=0.5")
  assert (balanced.input.sampler, balanced.input.balance_power, balanced.tags.balance) == ("balanced", 0.5, 0.5)


@pytest.mark.parametrize("arg", [
    "quick=true",
    "subset=adrenalmnist3d,conv=acs,quick=true",
    "subset=adrenalmnist3d,conv=2.5d,model=resnet50,size=64,recipe=improved,quick=true",
    "subset=pneumoniamnist,model=vit_hybrid,recipe=improved,quick=true",
    "subset=adrenalmnist3d,model=vit_hybrid,size=64,recipe=improved",
    "subset=organmnist3d,conv=3d,recipe=improved",
])
def test_choices_validate(arg):
  c = build.validate(_load(arg))
  assert c.total_steps == 4 if "quick" in arg else c.total_steps >= 100


@pytest.mark.parametrize("arg,message", [
    ("subset=breastmnist,conv=acs", r"conv='acs' does not fit the 2D subset 'breastmnist'; choose from 2d"),
    ("subset=adrenalmnist3d,conv=2d", r"conv='2d' does not fit the 3D subset .* 3d, acs, 2.5d"),
    ("subset=adrenalmnist3d,model=vit_hybrid,conv=acs", "exists for the ResNets only"),
    ("subset=chestmnist", "multi-label: not supported"),
    ("subset=adrenalmnist3d,size=128", r"size=128 is not a MedMNIST size of a 3D subset"),
    ("model=resnet34", "unknown model 'resnet34'"),
    ("recipe=best", "unknown recipe 'best'"),
    ("mixup=0.4", "mixup=0.4 needs recipe=improved"),
    ("recipe=improved,mixup=-1", "alpha >= 0"),
    ("balance=0.5", "balance=0.5 needs recipe=improved"),
    ("recipe=improved,balance=1.5", r"a power in \[0, 1\]"),
    ("recipe=finetune,model=vit_hybrid", "recipe=finetune's layer groups are the ResNet's"),
])
def test_bad_arguments_name_the_problem(arg, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    _load(arg)


def test_finetune_recipe_and_init(tmp_path):
  c = build.validate(_load(f"recipe=finetune,init={tmp_path}"))
  assert c.total_steps == 20 * 5 and c.schedule.warmup_steps == 2 * 5  # 20 epochs of ceil(546 / 128) steps
  assert (c.optim.layer_decay, c.optim.layer_groups[0], c.optim.layer_groups[-1]) == (0.75, "stem_*", "head")
  assert dict(c.init_from) == {"path": str(tmp_path), "exclude": ("head",)} and c.tags.init == str(tmp_path)
  inflated = _load(f"subset=adrenalmnist3d,init={tmp_path},quick=true")
  assert inflated.init_from.inflate == "average" and inflated.model.get("width") is None  # the pretrained model
  acs = _load(f"subset=adrenalmnist3d,conv=acs,init={tmp_path}")
  assert "inflate" not in acs.init_from  # ACS keeps 2D kernels
  relative = _load("init=runs/x")
  assert relative.init_from.path == os.path.join(REPO_ROOT, "runs", "x")


def test_sweep_is_three_seeds():
  assert _module().get_sweep(None) == [{"seed": 0}, {"seed": 1}, {"seed": 2}]


def _write_fake(data_dir, subset, sizes=(16, 8, 8), seed=0):
  info = mm.SUBSETS[subset]
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in zip(mm.SPLITS, sizes):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n,) + (28,) * info.spatial_dims, dtype=np.uint8)
    labels = np.arange(n) % 2  # both classes in every split, so the AUC is defined
    arrays[f"{split}_labels"] = rng.permutation(labels).astype(np.uint8)[:, None]
  np.savez_compressed(os.path.join(data_dir, mm.file_name(subset)), **arrays)


@pytest.mark.parametrize("arg", ["subset=breastmnist", "subset=adrenalmnist3d,conv=acs,recipe=improved,tta=true"],
                         ids=["2d_official", "3d_acs_improved_tta"])
def test_train_main_on_fake_files(tmp_path, arg):
  subset = arg.split(",")[0].split("=")[1]
  _write_fake(str(tmp_path), subset)
  c = _load(f"{arg},quick=true,data_dir={tmp_path}")
  assert c.data.data_dir == str(tmp_path)
  c.data.verify_md5 = False  # the fakes carry the official file names but not their MD5
  c.mesh = (("data", 1),)
  # One stage: on a loaded 2-core CPU compiling the (threefry, truncated-normal) initialiser costs seconds
  # per kernel; the full quick architecture is validated above and the ACS ResNet in test_acs.py.
  c.model.stage_sizes = (1,)
  workdir = str(tmp_path / "run")
  result = train.main(c, workdir)
  assert result["step"] == 4 and 0.0 <= result["val/auc"] <= 1.0 and result["val/num_cases"] == 8
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["tags"]["subset"] == subset and saved["test_split"] == "test"
  assert saved["model_name"] == ("resnet18_acs" if "acs" in arg else "resnet18")
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["status"] == "finished" and results["step"] == 4 and results["best"]["metric"] == "val/auc"
  assert 0.0 <= results["test"]["test/auc"] <= 1.0 and 0.0 <= results["test_best"]["test_best/auc"] <= 1.0
  assert results["test"]["test/num_cases"] == 8 and results["wall_s"] > 0


def test_random_labels_permutes_the_training_labels_with_the_seed():
  c = _load("recipe=improved,seed=2,random_labels=true")
  assert c.data.permute_train_labels == 2 and c.tags.random_labels
  assert "permute_train_labels" not in _load("recipe=improved").data
