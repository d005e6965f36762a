"""Config: defaults < YAML file < --key value, the saved config round-trips, bad values exit 2."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import REPO

from pet_pipeline.config import (
    Config,
    build_config,
    help_text,
    load_config,
    read_yaml,
    save_config,
    to_dict,
)
from pet_pipeline.errors import UserError

# train.py is a script, not part of the installed package: load it from the checkout, so this
# works under `pytest` as well as `python -m pytest`, installed or not.
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


def write(path, text: str):
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- precedence


def test_yaml_anchors_and_merge_keys_still_work_and_python_tags_are_still_refused(tmp_path):
    """A key given twice is refused, but a merged key overridden is what YAML means by `<<`."""
    values = read_yaml(write(tmp_path / "merge.yaml", "base: &base {lr: 1.0e-4, epochs: 3}\n"
                                                      "run:\n  <<: *base\n  lr: 3.0e-4\n"))
    assert values["run"] == {"lr": 3.0e-4, "epochs": 3}
    with pytest.raises(UserError, match="is not valid YAML"):
        read_yaml(write(tmp_path / "tag.yaml", "lr: !!python/object/apply:os.system ['true']\n"))


def test_cli_overrides_file_overrides_defaults(tmp_path):
    config_file = write(tmp_path / "run.yaml", (
        "epochs: 3\n"
        "lr: 1.0e-3\n"
        "species: dog\n"
        "breeds: [pug, beagle]\n"
        "augment: none\n"
        "pretrained: false\n"
        "image_size: 64\n"
    ))
    config = load_config(["--config", config_file, "--epochs", "5", "--augment=strong",
                          "--image-size", "96", "--data_dir", "null"])
    assert config.epochs == 5  # CLI beats the file
    assert config.augment == "strong"  # --key=value form
    assert config.image_size == 96  # --kebab-case works too
    assert config.lr == 1e-3 and config.species == "dog" and config.breeds == ["pug", "beagle"]
    assert config.pretrained is False  # file beats the default
    assert config.seed == Config().seed and config.model == "coatnet_0_rw_224"  # defaults
    assert config.data_dir is None

    # the order of --config among the overrides does not matter
    assert load_config(["--epochs", "5", "--augment", "strong", "--image_size", "96",
                        "--config", config_file]) == config


def test_cli_values_are_typed():
    config = load_config(["--pretrained", "false", "--strict_data", "true", "--lr", "3e-4",
                          "--breeds", "Bengal, Sphynx", "--num_workers", "0",
                          "--max_steps", "none", "--val_fraction", "0"])
    assert config.pretrained is False and config.strict_data is True
    assert config.lr == pytest.approx(3e-4) and isinstance(config.lr, float)
    assert config.breeds == ["Bengal", "Sphynx"]
    assert config.num_workers == 0 and config.max_steps is None and config.val_fraction == 0.0


def test_cli_habits_bare_booleans_short_config_and_unknown_keys(tmp_path):
    config_file = write(tmp_path / "run.yaml", "epochs: 3\ncompile: true\n")
    config = load_config(["-c", config_file, "--no-compile", "--strict_data", "--pretrained",
                          "false", "--sync-bn", "--lr", "1e-3"])
    assert config.epochs == 3 and config.compile is False  # --no-compile beats the file
    assert config.strict_data is True and config.sync_bn is True  # bare flags are true
    assert config.pretrained is False and config.lr == 1e-3  # `--flag false` still works
    assert load_config(["--channels_last", "--epochs", "2"]).channels_last is True
    with pytest.raises(UserError, match="unknown key 'upload_model'"):
        load_config(["--upload_model"])  # not "missing value"
    with pytest.raises(UserError, match="unknown key 'no_lr'"):
        load_config(["--no-lr"])  # --no- only for booleans
    with pytest.raises(UserError, match="epochs: missing value"):
        load_config(["--epochs", "--lr", "1e-3"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(["--species", "all", "--breeds", "pug,Bengal", "--lr", "2.5e-4",
                          "--image_size", "128", "--ema_decay", "0.999", "--clip_grad_norm", "null",
                          "--output_dir", str(tmp_path / "run"), "--seed", "7"])
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert build_config(read_yaml(str(path))) == config
    assert load_config(["--config", str(path)]) == config
    assert set(read_yaml(str(path))) == {f.name for f in dataclasses.fields(Config)}  # fully resolved
    assert to_dict(config)["breeds"] == ["pug", "Bengal"]


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == help_text() + "\n"
    for name in ("dataset", "data_dir", "species", "breeds", "val_fraction", "strict_data",
                 "image_size", "augment", "num_workers", "model", "seed", "output_dir"):
        assert f"--{name} " in out


# ----------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("values, key, fragment", [
    ({"epoch": 3}, "epoch", "did you mean 'epochs'?"),
    ({"epochs": "abc"}, "epochs", "is not an integer"),
    ({"epochs": 2.5}, "epochs", "is not an integer"),
    ({"epochs": [1, 2]}, "epochs", "is not an integer"),
    ({"pretrained": "maybe"}, "pretrained", "true or false"),
    ({"lr": True}, "lr", "is not a number"),
    ({"species": "fish"}, "species", "choose one of cat, dog, all"),
    ({"augment": "heavy"}, "augment", "choose one of none, standard, strong"),
    ({"val_fraction": 1.5}, "val_fraction", "must be in [0, 1)"),
    ({"batch_size": 0}, "batch_size", ">= 1"),
    ({"image_size": 8}, "image_size", ">= 16"),
    ({"breeds": []}, "breeds", "the list is empty"),
    ({"breeds": [1, 2]}, "breeds", "comma-separated list"),
    ({"epochs": None}, "epochs", "a value is required"),
    ({"lr": "nan"}, "lr", "not a finite number"),  # nan passes every >= check
    ({"lr": float("inf")}, "lr", "not a finite number"),
    ({"weight_decay": "-inf"}, "weight_decay", "not a finite number"),
    ({"mixup": "inf"}, "mixup", "not a finite number"),
    ({"min_lr": float("nan")}, "min_lr", "not a finite number"),
])
def test_build_config_rejects_bad_values_naming_the_key(values, key, fragment):
    with pytest.raises(UserError) as error:
        build_config(values)
    message = str(error.value)
    assert key in message.split(":")[0] and fragment in message and "\n" not in message


def test_config_validates_itself():
    with pytest.raises(UserError, match=r"^species: 'fish' is not allowed"):
        Config(species="fish")


def _bad_yaml(tmp_path):
    return ["--config", write(tmp_path / "bad.yaml", "epochs: 3\nlr: [1e-4\nseed: 1\n")]


def _unknown_key_in_file(tmp_path):
    return ["--config", write(tmp_path / "typo.yaml", "batchsize: 16\n")]


def _not_a_mapping(tmp_path):
    return ["--config", write(tmp_path / "list.yaml", "- epochs\n- 3\n")]


def _key_twice(tmp_path):
    return ["--config", write(tmp_path / "twice.yaml", "lr: 1.0e-4\nepochs: 3\n# later\nlr: 3.0e-4\n")]


def _key_twice_nested(tmp_path):  # a mapping inside a value is checked as well
    return ["--config", write(tmp_path / "nested.yaml", "epochs: 2\nnotes:\n  a: 1\n  a: 2\n")]


def _not_text(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    return ["--config", str(path)]


def _huge_file(tmp_path):
    """A 2 MB YAML file (a log or data file given by mistake; at 50 MB parsing it ended in a
    MemoryError traceback): refused from its size, before it is read."""
    return ["--config", write(tmp_path / "huge.yaml", "# a comment line of forty characters..\n" * 50_000
                              + "epochs: 1\n")]


BAD_COMMAND_LINES = {  # id -> (argv or a function of tmp_path, the key named, what the line says)
    "unknown-key": (["--epoch", "3"], "epoch", "did you mean 'epochs'?"),
    "unknown-key-in-file": (_unknown_key_in_file, "batchsize", "did you mean 'batch_size'?"),
    "wrong-type": (["--epochs", "abc"], "epochs", "'abc' is not an integer"),
    "wrong-bool": (["--pretrained", "maybe"], "pretrained", "true or false"),
    "bad-choice": (["--species", "fish"], "species", "choose one of cat, dog, all"),
    "out-of-range": (["--val_fraction", "1.5"], "val_fraction", "[0, 1)"),
    "bad-yaml": (_bad_yaml, "config", "is not valid YAML (line"),
    "yaml-not-a-mapping": (_not_a_mapping, "config", "must hold a mapping"),
    "key-twice": (_key_twice, "config", "gives 'lr' twice (lines 1 and 4); keep the one you mean"),
    "key-twice-nested": (_key_twice_nested, "config", "gives 'a' twice (lines 3 and 4)"),
    "not-text": (_not_text, "config", "is not valid YAML"),
    "huge-file": (_huge_file, "config", "is 2.0 MB, not a config file (they hold a few KB"),
    "missing-config-file": (["--config", "no/such/file.yaml"], "config", "does not exist"),
    "missing-value": (["--epochs"], "epochs", "missing value"),
    "positional": (["fast"], "fast", "options look like --key value"),
    "unknown-model": (["--model", "coatnet_0_rw_22"], "model", "did you mean 'coatnet_0_rw_224'?"),
    "unknown-breed": (["--breeds", "Siamse"], "breeds", "did you mean 'Siamese'?"),
    "breed-of-other-species": (["--breeds", "pug"], "breeds", "species is 'cat'"),
}


@pytest.mark.parametrize("case", list(BAD_COMMAND_LINES))
def test_train_exits_2_with_one_line_naming_the_key(case, tmp_path, capsys):
    argv, key, fragment = BAD_COMMAND_LINES[case]
    argv = argv(tmp_path) if callable(argv) else argv
    out_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--output_dir", str(out_dir)] if case != "missing-value" else argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and key in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists()  # stopped before writing anything


def test_real_process_exits_2_without_traceback(tmp_path):
    # One real run (each costs seconds of torch/timm imports): the error raised deepest before
    # any heavy work, after the config passed, goes through the same exit as a config error.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "train.py", "--model", "coatnet_0_rw_22", "--report_to", "none",
         "--output_dir", str(tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: model: 'coatnet_0_rw_22' is not a timm model; did you mean 'coatnet_0_rw_224'?"
    ]
    assert result.stdout == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script, argv", [("train.py", ["--lr", "abc"]),
                                          ("evaluate.py", ["--split", "nope"]),
                                          ("evaluate.py", ["--model_dir", "runs/no-such-run/model"]),
                                          ("evaluate.py", ["--model_dir", "tests"])])
def test_config_mistakes_answer_before_torch_is_imported(script, argv):
    """--help and config errors need no torch, timm or datasets: they answer at once."""
    probe = (f"import runpy, sys\nsys.argv = [{script!r}, *{argv!r}]\n"
             f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print(e.code, sorted(m for m in ('torch', 'timm', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split("\n")[0] == "2 []", result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_plateau_needs_a_validation_split():
    from pet_pipeline.config import build_config
    from pet_pipeline.errors import UserError

    with pytest.raises(UserError, match="scheduler: plateau"):
        build_config({"scheduler": "plateau", "val_fraction": 0})
    assert build_config({"scheduler": "plateau", "val_fraction": 0.1}).scheduler == "plateau"
