"""Recipes as files: built-in presets are `recipes/*.toml`, `kdq recipe show` prints one whole, `--recipe` runs a
file like the preset it came from, and a wrong key or value is a one-line error naming it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from kdq import checkpoint as ck
from kdq.cli import main
from kdq.config import Preset
from kdq.presets import PRESET_NAMES, RECIPES_DIR, get_preset, load_recipe


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def leaf_keys(d: dict, prefix: str = "") -> set[str]:
    return {
        k for key, v in d.items() for k in (leaf_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])
    }


def test_every_builtin_preset_is_a_recipe_file():
    assert set(PRESET_NAMES) == {"cifar10", "cifar100", "demo", "fashion-mnist", "fashion-mnist-cpu", "smoke"}
    for name in PRESET_NAMES:
        assert (RECIPES_DIR / f"{name}.toml").is_file() and get_preset(name).name == name


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_recipe_show_prints_every_field_and_reads_back_the_same(name, tmp_path):
    result = invoke("recipe", "show", "--preset", name)
    assert result.exit_code == 0, result.output
    file = tmp_path / "mine.toml"
    file.write_text(result.output)
    preset = get_preset(name)
    assert load_recipe(file) == dataclasses.replace(preset, name=name)  # the file keeps the preset's name
    written = leaf_keys(load_toml_dict(file))
    unset = {k for k in leaf_keys(preset.to_dict()) if _get(preset.to_dict(), k) is None}
    assert written | unset == leaf_keys(preset.to_dict())  # every field of Preset is reachable from a file
    assert all(f"# {k} is not set" in result.output for k in unset)


def load_toml_dict(path):
    from kdq.tomlfile import tomllib

    return tomllib.loads(path.read_text())


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_a_file_names_only_what_differs_and_takes_its_name_from_the_file(tmp_path):
    file = tmp_path / "wd.toml"
    file.write_text('dataset = "digits"\nteacher = "resnet20"\n[student_optim]\nepochs = 2\nlr = 0.1\n'
                    'weight_decay = 1e-4\n[quant]\nfreeze_bn_after = 0.5\n')  # fmt: skip
    preset = load_recipe(file)
    assert preset.name == "wd" and preset.student_optim.weight_decay == 1e-4 and preset.quant.freeze_bn_after == 0.5
    assert preset.student_optim.momentum == Preset.__dataclass_fields__["student_optim"].default_factory().momentum


@pytest.mark.parametrize(
    "body, message",
    [
        ('dataset = "digits"\nteacher = "resnet20"\nteachr = "x"\n', "unknown key 'teachr'"),
        ('dataset = "digits"\nteacher = "resnet20"\n[student_optim]\nepochs = 1\nlr = 0.1\nlrr = 2\n',
         "unknown key 'student_optim.lrr'"),
        ('dataset = "digits"\nteacher = "resnet20"\n[quant.qat_optim]\nepochs = 1\nlr = 0.1\nshedule = "cosine"\n',
         "unknown key 'quant.qat_optim.shedule'"),
        ('dataset = "digits"\nteacher = "resnet20"\nalpha = "high"\n', "alpha: expected float, got 'high'"),
        ('dataset = "digits"\nteacher = "resnet20"\n[teacher_optim]\nepochs = true\nlr = 0.1\n',
         "teacher_optim.epochs: expected int, got True"),
        ('dataset = "digits"\nteacher = "resnet20"\nalpha = 1.5\n', "alpha: 1.5 is out of range (must be in [0, 1])"),
        ('dataset = "digits"\nteacher = "resnet20"\n[student_optim]\nepochs = 1\nlr = 0\n',
         "student_optim.lr: 0.0 is out of range (must be > 0)"),
        ('dataset = "mnist"\nteacher = "resnet20"\n', "dataset: 'mnist' is not one of: digits"),
        ('dataset = "digits"\nteacher = "resnet20"\nkd_weighting = "mean"\n',
         "kd_weighting: 'mean' is not one of: blend, sum"),
        ('dataset = "digits"\nteacher = "resnet20"\nstudent = "resnet8"\nstudent_width = 0.5\n',
         "student_width applies to MobileNetV2 students; resnet8 has one width (got 0.5)"),
        ('dataset = "digits"\nteacher = "resnet20"\n[augment]\nflip = 1\n', "augment.flip: expected bool, got 1"),
        ('dataset = "digits"\nteacher = "resnet20"\naugment = 3\n', "augment: expected a table"),
        ('dataset = "digits"\nteacher = "resnet20"\n[quant]\nflow = "pt2e"\nbackend = "qnnpack"\n',
         "quant.backend: the pt2e flow has no backend 'qnnpack'"),
        ('dataset = "digits"\nteacher = \n', "not valid TOML"),
        ('teacher = "resnet20"\n', "missing key 'dataset'"),
    ],
)  # fmt: skip
def test_bad_recipes_are_one_line_errors_naming_the_key(tmp_path, body, message):
    file = tmp_path / "bad.toml"
    file.write_text(body)
    result = invoke("recipe", "show", "--recipe", file)
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert "\n" not in line and message in line and str(file) in line


def test_preset_and_recipe_together_or_a_missing_file_are_refused(tmp_path):
    result = invoke("teacher", "--preset", "smoke", "--recipe", RECIPES_DIR / "smoke.toml")
    assert result.exit_code == 1 and "not both" in result.output
    result = invoke("pipeline", "--recipe", tmp_path / "nope.toml")
    assert result.exit_code == 1 and "kdq recipe show" in result.output


def test_recipe_file_trains_exactly_like_its_preset_and_options_still_override(tmp_path):
    shown = tmp_path / "smoke.toml"
    shown.write_text(invoke("recipe", "show", "--preset", "smoke").output)
    common = ["baseline", "--device", "cpu", "--epochs", "1", "--train-subset", "300"]
    runs = {}
    for name, source in (("preset", ["--preset", "smoke", "--no-tensorboard"]), ("recipe", ["--recipe", shown])):
        result = invoke(*common, *source, "--run-dir", tmp_path / name)
        assert result.exit_code == 0, result.output
        runs[name] = ck.load_checkpoint(tmp_path / name / "baseline" / "checkpoint.pt")
    assert runs["preset"][ck.PRESET] == runs["recipe"][ck.PRESET]
    assert runs["recipe"][ck.PRESET]["student_optim"]["epochs"] == 1  # --epochs overrode the file's 6
    assert not (tmp_path / "preset" / "tb").exists() and list((tmp_path / "recipe" / "tb" / "baseline").iterdir())
    a, b = runs["preset"][ck.MODEL], runs["recipe"][ck.MODEL]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resnet_student_trains_and_quantizes_from_a_recipe(tmp_path):
    """`student = "resnet8"`: a CIFAR ResNet student trains, PTQ makes it int8, and it scores like its float self;
    a width, which only MobileNetV2 students have, is refused before any training."""
    file = tmp_path / "resnet-student.toml"
    file.write_text('dataset = "digits"\nteacher = "resnet20"\nstudent = "resnet8"\n[student_optim]\nepochs = 4\n'
                    'lr = 0.1\nbatch_size = 64\n[quant]\ncalibration_batches = 4\n')  # fmt: skip
    run = tmp_path / "run"
    result = invoke("baseline", "--recipe", file, "--device", "cpu", "--run-dir", run, "--no-tensorboard")
    assert result.exit_code == 0, result.output
    saved = ck.load_checkpoint(run / "baseline" / "checkpoint.pt")
    assert saved[ck.ARCH] == {"name": "resnet8", "num_classes": 10, "kwargs": {}}
    result = invoke("quantize", run / "baseline" / "checkpoint.pt")
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", run / "baseline" / "checkpoint.pt", run / "baseline_ptq" / "checkpoint.pt",
                    "--out", tmp_path / "eval.json")  # fmt: skip
    assert result.exit_code == 0, result.output
    top1 = {k: v["top1"] for k, v in json.loads((tmp_path / "eval.json").read_text()).items()}
    assert top1["baseline"] > 0.5 and abs(top1["baseline"] - top1["baseline_ptq"]) < 0.05, top1
    for command in ("baseline", "distill"):  # refused before anything is read or trained
        result = invoke(command, "--recipe", file, "--width", "0.5", "--run-dir", tmp_path / "w")
        assert result.exit_code == 1, (command, result.output)
        assert "student_width applies to MobileNetV2 students; resnet8 has one width (got 0.5)" in result.output
    assert not (tmp_path / "w").exists()
