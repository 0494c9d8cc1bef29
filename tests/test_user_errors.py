"""Bad input gives one line that names the bad value and what would be valid, never a traceback; a bug gives
one ``internal error`` line; ``--debug`` shows the traceback."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
import yaml
from conftest import language_assets, randomise_adapter, tiny_mamba
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import lily_ssm
from lily_ssm import AdapterLoadError, LilyConfig, LoraConfig
from lily_ssm import cli as cli_module
from lily_ssm.cli import error_message
from lily_ssm.cli import main as cli
from lily_ssm.config.experiment import load_config, parse_config
from lily_ssm.data.commonsense import TEST_FIELDS, DataError, read_rows
from lily_ssm.data.vtab import VTabDataset, read_list_file, write_fake_vtab
from lily_ssm.models.loading import resolve_model_path
from lily_ssm.models.vim import load_vim_checkpoint
from lily_ssm.persistence import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from lily_ssm.tuners import merge_adapter
from lily_ssm.utils.safe_load import TensorFileError, load_tensors_file
from lily_ssm.utils.sections import ConfigError

LILY = {"method": "lily", "targets": ["in_proj"], "r": 4, "num_A": 1, "num_B": 2}
GOOD_ROW = {"instruction": "q", "input": "", "output": "the correct answer is true", "answer": "true"}


def one_line_error(capsys, needle: str, prefix: str = "error:") -> str:
    """The captured stderr, checked to be a single line holding ``prefix`` and ``needle``."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]  # transformers' progress bars
    assert len(lines) == 1, err
    assert prefix in lines[0] and needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def experiment(tmp_path, **training) -> dict:
    return {"model": {"name_or_path": str(tmp_path / "no-model")}, "adapter": dict(LILY),
            "data": {"train_file": str(tmp_path / "train.json")},
            "training": {"output_dir": str(tmp_path / "run"), **training}}


def config_file(tmp_path, raw=None, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw or experiment(tmp_path)))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return language_assets(tmp_path_factory.mktemp("assets"), train_per_task=2, test_per_task=1)


@pytest.fixture
def data_root(tmp_path):
    """A test-set root with a valid boolq/test.json, so eval-commonsense gets past its file checks."""
    (tmp_path / "tests" / "boolq").mkdir(parents=True)
    (tmp_path / "tests" / "boolq" / "test.json").write_text(json.dumps([GOOD_ROW]))
    return tmp_path / "tests"


# --------------------------------------------------------------------------------------------------
# The CLI's error handling (all subcommands)


def test_bug_is_one_internal_error_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise TypeError("'NoneType' object is not subscriptable\nsecond line")

    monkeypatch.setattr(cli_module, "_train", broken)
    assert cli(["train", "x.yaml"]) == 1
    line = one_line_error(capsys, "TypeError: 'NoneType' object is not subscriptable second line", "internal error:")
    assert line.startswith("lily-ssm train: internal error:")
    assert line.endswith("(rerun with --debug for the traceback)")
    for argv in (["--debug", "train", "x.yaml"], ["train", "--debug", "x.yaml"], ["train", "x.yaml", "--debug"]):
        with pytest.raises(TypeError):
            cli(argv)


def test_user_error_with_debug_reraises(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        cli(["--debug", "train", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="does not exist"):
        cli(["vtab", str(tmp_path / "missing.yaml"), "--task", "dtd", "--debug"])


def test_every_subcommand_goes_through_the_same_handling(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert cli(["vtab", missing, "--task", "dtd"]) == 2
    assert one_line_error(capsys, "missing.yaml does not exist").startswith("lily-ssm vtab: error:")
    assert cli(["ablate", missing]) == 2
    assert one_line_error(capsys, "missing.yaml").startswith("lily-ssm ablate: error:")
    assert cli(["inspect", str(tmp_path / "nowhere")]) == 2
    assert one_line_error(capsys, "nowhere does not exist").startswith("lily-ssm inspect: error:")
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("lily_ssm.quickstart.run_quickstart",
                        lambda out, reduced: (tmp_path / "file" / "sub").mkdir(parents=True))
    assert cli(["quickstart", "--out", str(tmp_path / "file")]) == 2
    assert one_line_error(capsys, "file").startswith("lily-ssm quickstart: error:")
    monkeypatch.setattr(cli_module, "_lm_eval", lambda args: {}["bug"])
    assert cli(["lm-eval", "--model", "lily"]) == 1
    assert one_line_error(capsys, "KeyError: 'bug'", "internal error:").startswith("lily-ssm lm-eval: internal error:")
    with pytest.raises(KeyError):
        cli(["--debug", "lm-eval", "--model", "lily"])
    with pytest.raises(KeyError):
        cli(["lm-eval", "--debug", "--model", "lily"])


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli(["bogus"])
    assert info.value.code == 2
    one_line_error(capsys, "invalid choice: 'bogus'")


@pytest.mark.parametrize("exc, expected", [
    (PermissionError(13, "Permission denied", "/data/train.json"), "/data/train.json: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "/data"), "/data: Is a directory"),
    (OSError(28, "No space left on device"), "No space left on device"),
    (OSError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
             '  File "x.py", line 1, in f\nOSError: cannot read image /a.png (listed in /t.txt:3)'),
     "OSError: cannot read image /a.png (listed in /t.txt:3)"),
])
def test_os_errors_are_user_errors_on_one_line(exc, expected, monkeypatch, capsys):
    assert cli_module.is_user_error(exc)
    assert error_message(exc) == expected

    def fail(args):
        raise exc

    monkeypatch.setattr(cli_module, "_train", fail)
    assert cli(["train", "x.yaml"]) == 2
    one_line_error(capsys, expected)


# --------------------------------------------------------------------------------------------------
# 1. null required fields


@pytest.mark.parametrize("row, required, field", [
    ({"instruction": "q", "output": None}, None, "output"),
    ({"instruction": None, "output": "a"}, None, "instruction"),
    ({"instruction": "q", "answer": None}, TEST_FIELDS, "answer"),
])
def test_null_required_field_names_file_row_and_field(tmp_path, row, required, field):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD_ROW, row]))
    with pytest.raises(DataError) as info:
        read_rows(path, *([required] if required else []))
    assert str(info.value) == f"{path}: row 1 field {field!r} is null, expected text"


def test_data_file_that_is_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"data file {tmp_path} is a folder; give a .json list or a .jsonl"):
        read_rows(tmp_path)


def test_null_input_is_still_an_empty_input(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{**GOOD_ROW, "input": None}]))
    assert read_rows(path)[0]["input"] == ""


def test_null_fields_through_the_cli(assets, tmp_path, capsys):
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"instruction": "q", "output": None}]))
    raw = experiment(tmp_path)
    raw["model"] = {"name_or_path": assets["base"], "dtype": "float32"}
    raw["data"] = {"train_file": str(train), "val_set_size": 0}
    assert cli(["train", str(config_file(tmp_path, raw))]) == 2
    one_line_error(capsys, "train.json: row 0 field 'output' is null, expected text")
    root = tmp_path / "tests"
    (root / "boolq").mkdir(parents=True)
    (root / "boolq" / "test.json").write_text(json.dumps([{"instruction": "q", "answer": None}]))
    assert cli(["eval-commonsense", "--model", assets["base"], "--data-root", str(root), "--tasks", "boolq"]) == 2
    one_line_error(capsys, "boolq/test.json: row 0 field 'answer' is null")


# --------------------------------------------------------------------------------------------------
# 2. files that are not UTF-8


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_non_utf8_data_file_is_named(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    row = {"instruction": "caf\u00e9", "output": "x"}
    text = json.dumps(row if suffix == ".jsonl" else [row], ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text") as info:
        read_rows(path)
    assert str(path) in str(info.value)


def test_non_utf8_vtab_list_and_config_are_named(tmp_path, capsys):
    task_dir = write_fake_vtab(tmp_path, "dtd", classes=2, per_class=1, image_size=8)
    (task_dir / "test.txt").write_bytes((task_dir / "test.txt").read_bytes() + b"images/caf\xe9.png 1\n")
    with pytest.raises(ValueError, match=r"test\.txt:3: not UTF-8 text") as info:
        read_list_file(task_dir / "test.txt", 47)
    assert str(task_dir / "test.txt") in str(info.value)
    config = tmp_path / "exp.yaml"
    config.write_bytes(b"model: {name_or_path: caf\xe9}\n")
    assert cli(["train", str(config)]) == 2
    one_line_error(capsys, f"{config} is not UTF-8 text")


# --------------------------------------------------------------------------------------------------
# 3. numeric ranges


@pytest.mark.parametrize("section, key, value, valid", [
    ("training", "micro_batch_size", 0, "a whole number >= 1"),
    ("training", "batch_size", 0, "a whole number >= 1"),
    ("data", "cutoff_len", -5, "a whole number >= 1"),
    ("data", "val_set_size", -1, "a whole number >= 0"),
    ("training", "epochs", -1.0, "a number > 0"),
    ("training", "max_steps", 0, "a whole number >= 1 (or -1: train for epochs)"),
    ("training", "max_steps", -2, "a whole number >= 1 (or -1: train for epochs)"),
    ("training", "learning_rate", 0.0, "a number > 0"),
    ("training", "learning_rate", float("nan"), "a number > 0"),
    ("training", "warmup_steps", -1, "a whole number >= 0"),
    ("training", "eval_steps", 0, "a whole number >= 1"),
    ("training", "save_steps", 0, "a whole number >= 1"),
    ("training", "logging_steps", 0, "a whole number >= 1"),
    ("training", "save_total_limit", 0, "a whole number >= 1"),
])
def test_out_of_range_values_are_refused_at_parse(tmp_path, section, key, value, valid):
    raw = experiment(tmp_path)
    raw[section][key] = value
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "exp.yaml")
    assert str(info.value) == f"exp.yaml: {section}.{key}={value!r} is out of range; it must be {valid}"


def test_max_steps_minus_one_means_epochs(tmp_path):
    assert parse_config(experiment(tmp_path, max_steps=-1, epochs=2.0)).training.max_steps == -1


def test_range_errors_through_the_cli(tmp_path, capsys):
    path = config_file(tmp_path)
    assert cli(["train", str(path), "--set", "training.micro_batch_size=0"]) == 2
    one_line_error(capsys, "training.micro_batch_size=0 is out of range; it must be a whole number >= 1")
    assert cli(["train", str(path), "--set", "training.x=[1,"]) == 2
    one_line_error(capsys, "--set 'training.x=[1,'")


# --------------------------------------------------------------------------------------------------
# 4. a local model path that does not exist


@pytest.mark.parametrize("name", ["/no/such/dir", "./org/name", "../models/m", "runs/x/y", "~/no-such-model-dir",
                                  "runs/"])
def test_missing_local_model_path(name):
    with pytest.raises(FileNotFoundError, match=f"^model folder {name} does not exist; give a local model folder, a "
                                                "Hub id \\(org/name\\) or builtin:tiny-falcon-mamba$"):
        resolve_model_path(name)


@pytest.mark.parametrize("name", ["org/name", "tiiuae/falcon-mamba-7b", "gpt2"])
def test_hub_ids_are_hub_ids(name, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # empty, and HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(ValueError, match=f"model '{name}' is not in the local Hugging Face cache .*hf download {name}"):
        resolve_model_path(name)


def test_missing_model_through_the_cli(tmp_path, data_root, capsys):
    assert cli(["eval-commonsense", "--model", "/no/such/dir", "--data-root", str(data_root), "--tasks", "boolq"]) == 2
    assert one_line_error(capsys, "model folder /no/such/dir does not exist") == (
        "lily-ssm eval-commonsense: error: model folder /no/such/dir does not exist; give a local model folder, a Hub "
        "id (org/name) or builtin:tiny-falcon-mamba")
    (tmp_path / "weights.bin").write_text("x")
    assert cli(["eval-commonsense", "--model", str(tmp_path / "weights.bin"), "--data-root", str(data_root),
                "--tasks", "boolq"]) == 2
    one_line_error(capsys, "weights.bin is a file; give the folder")


# --------------------------------------------------------------------------------------------------
# 5. an output_dir that is a file


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match="training.output_dir=.*taken' is an existing file; it must be a folder"):
        parse_config(experiment(tmp_path, output_dir=str(tmp_path / "taken")))
    with pytest.raises(ConfigError, match="training.output_dir=.*lies under .*taken, which is a file"):
        parse_config(experiment(tmp_path, output_dir=str(tmp_path / "taken" / "run")))
    assert cli(["train", str(config_file(tmp_path)), "--set", f"training.output_dir={tmp_path / 'taken'}"]) == 2
    one_line_error(capsys, "training.output_dir=")


# --------------------------------------------------------------------------------------------------
# 6. adapter_config.json of the wrong shape


@pytest.fixture
def saved(tmp_path):
    model = lily_ssm.apply_adapter(tiny_mamba(layers=2), LilyConfig(targets=["in_proj"], r=2, num_A=1, num_B=2))
    randomise_adapter(model)
    return lily_ssm.save_adapter(model, tmp_path / "adapter")


def edit_meta(folder, change):
    path = folder / CONFIG_NAME
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(change(meta)))


BAD_META = {
    "number": (lambda m: 5, "holds a JSON int, expected an object"),
    "null": (lambda m: None, "holds a JSON null, expected an object"),
    "list": (lambda m: [], "holds a JSON list, expected an object"),
    "config": (lambda m: {**m, "config": 5}, "config is int 5, expected an object"),
    "base_model": (lambda m: {**m, "base_model": "FalconMamba"}, "base_model is string \"FalconMamba\", expected an"),
    "dimensions": (lambda m: {**m, "base_model": {**m["base_model"], "dimensions": []}},
                   "base_model.dimensions is list [], expected an object"),
    "modules": (lambda m: {**m, "modules": [1]}, "modules is list [1], expected an object"),
    "module shape": (lambda m: {**m, "modules": {k: "x" for k in m["modules"]}}, "expected [in_features, out_f"),
    "tensors": (lambda m: {**m, "tensors": "A"}, "tensors is string \"A\", expected an object"),
    "tensor entry": (lambda m: {**m, "tensors": {k: 3 for k in m["tensors"]}}, "expected an object {shape, dtype}"),
    "tensor shape": (lambda m: {**m, "tensors": {k: {"shape": None} for k in m["tensors"]}},
                     "shape is null null, expected a list of sizes"),
    "groups": (lambda m: {**m, "groups": {"in_proj": {"num_layers": "2", "modules": []}}},
               "groups['in_proj'].num_layers is string \"2\", expected a whole number >= 1"),
    "format_version": (lambda m: {**m, "format_version": "1"}, "has format_version '1'"),
    "config contents": (lambda m: {**m, "config": {**m["config"], "r": "four"}}, "config: r='four'"),
}


@pytest.mark.parametrize("case", list(BAD_META))
def test_adapter_config_of_the_wrong_shape(saved, case):
    change, needle = BAD_META[case]
    edit_meta(saved, change)
    for load in (lambda: lily_ssm.load_adapter(tiny_mamba(layers=2), saved), lambda: read_adapter(saved)):
        with pytest.raises(AdapterLoadError) as info:
            load()
        assert str(saved / CONFIG_NAME) in str(info.value) and needle in str(info.value), str(info.value)
        assert "\n" not in str(info.value)


def test_bad_adapter_config_through_eval_commonsense_and_inspect(saved, data_root, capsys):
    edit_meta(saved, lambda m: {**m, "config": 5})
    # the adapter is checked before the model loads: the model path does not even exist
    assert cli(["eval-commonsense", "--model", "/no/such/model", "--adapter", str(saved),
                "--data-root", str(data_root), "--tasks", "boolq"]) == 2
    one_line_error(capsys, f"{saved / CONFIG_NAME}: config is int 5, expected an object")
    assert cli(["inspect", str(saved)]) == 2
    one_line_error(capsys, f"{saved / CONFIG_NAME}: config is int 5, expected an object")


# --------------------------------------------------------------------------------------------------
# 7. eval-commonsense numbers are checked before the model loads


@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--limit", "-1"), ("--num-beams", "0"),
                                         ("--batch-size", "0"), ("--max-new-tokens", "0"), ("--limit", "many")])
def test_eval_numbers_are_checked_before_the_model_loads(data_root, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        cli(["eval-commonsense", "--model", "/no/such/model", "--data-root", str(data_root), flag, value])
    assert info.value.code == 2
    line = one_line_error(capsys, f"argument {flag}: ")
    assert "whole number >= 1" in line and "model" not in line.split(flag)[1]


# --------------------------------------------------------------------------------------------------
# 8. VTAB: corrupt images, list lines outside the task folder


def test_corrupt_image_names_the_image_and_its_list_line(tmp_path):
    write_fake_vtab(tmp_path, "eurosat", classes=2, per_class=1, image_size=8)
    ds = VTabDataset(tmp_path, "eurosat", "test", image_size=8)
    bad_path, _ = ds.samples[1]
    bad_path.write_bytes(b"these bytes are not an image")
    with pytest.raises(OSError) as info:
        ds[1]
    message = str(info.value)
    assert message.startswith(f"cannot read image {bad_path}: not an image file")
    assert message.endswith(f"(listed in {ds.list_path}:2)") and "\n" not in message


@pytest.mark.parametrize("line", ["../../x.png 1", "{abs} 1", "images/../../outside.png 1", "link/secret.png 1"])
def test_list_line_outside_the_task_folder_is_refused(tmp_path, capsys, line):
    task_dir = write_fake_vtab(tmp_path / "root", "dtd", classes=2, per_class=1, image_size=8)
    outside = tmp_path / "outside.png"
    outside.write_bytes((task_dir / ds_first(task_dir)).read_bytes())
    (tmp_path / "root" / "x.png").write_bytes(outside.read_bytes())
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "secret.png").write_bytes(outside.read_bytes())
    os.symlink(tmp_path / "secret", task_dir / "link")
    (task_dir / "outside.png").write_bytes(outside.read_bytes())  # a same-named file inside does not help
    line = line.format(abs=outside)
    with open(task_dir / "train800val200.txt", "a") as handle:
        handle.write(line + "\n")
    lineno = len((task_dir / "train800val200.txt").read_text().splitlines())
    rel = line.rsplit(maxsplit=1)[0]
    expected = f"{task_dir / 'train800val200.txt'}:{lineno}: image path {rel!r} points outside the task folder"
    with pytest.raises(ValueError, match="points outside the task folder") as info:
        VTabDataset(tmp_path / "root", "dtd", "train800val200")
    assert str(info.value).startswith(expected)
    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "vim", "tiny.yaml")
    assert cli(["vtab", tiny, "--task", "dtd", "--set", f"data.root={tmp_path / 'root'}",
                "--set", f"training.output_dir={tmp_path / 'out'}"]) == 2
    one_line_error(capsys, expected)


def ds_first(task_dir) -> str:
    return (task_dir / "test.txt").read_text().splitlines()[0].rsplit(maxsplit=1)[0]


def test_paths_inside_the_task_folder_still_load(tmp_path):
    task_dir = write_fake_vtab(tmp_path, "dtd", classes=2, per_class=1, image_size=8)
    first = ds_first(task_dir)
    (task_dir / "test.txt").write_text(f"./{first} 0\nimages/../{first} 1\n")
    assert len(VTabDataset(tmp_path, "dtd", "test", image_size=8)) == 2


# --------------------------------------------------------------------------------------------------
# 9. .pth files that are not weights


def test_pickle_of_python_objects_is_refused_by_name(tmp_path):
    path = tmp_path / "vim.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "callback": print}, path)
    with pytest.raises(TensorFileError) as info:
        load_vim_checkpoint(path)
    assert str(info.value) == (
        f"Vim checkpoint {path} is not a weights file: it holds Python objects other than tensors (print), so it was "
        "refused (only weights_only pickles load; a truncated file can look like this too)")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"x": {1, 2}}))
    with pytest.raises(TensorFileError, match="optimizer state .*plain.pkl is not a weights file"):
        load_tensors_file(plain, "optimizer state")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_pth_file_is_one_line(tmp_path, damage):
    path = tmp_path / "vim.pth"
    torch.save({"model": {"w": torch.zeros(64)}}, path)
    data = {"truncated": path.read_bytes()[:200], "garbage": b"hello, not a checkpoint", "empty": b""}[damage]
    path.write_bytes(data)
    with pytest.raises(TensorFileError) as info:
        load_vim_checkpoint(path)
    assert str(info.value).startswith(f"Vim checkpoint {path} is not a readable PyTorch file (truncated or corrupted?)")
    assert "\n" not in str(info.value)


def test_missing_or_folder_pth(tmp_path):
    with pytest.raises(FileNotFoundError, match="optimizer state .*nope.pt does not exist"):
        load_tensors_file(tmp_path / "nope.pt", "optimizer state")
    with pytest.raises(IsADirectoryError, match="is a folder, expected a file"):
        load_tensors_file(tmp_path, "Vim checkpoint")
    assert torch.equal(load_tensors_file(save_to(tmp_path / "ok.pt", {"w": torch.ones(2)}), "x")["w"], torch.ones(2))


def save_to(path, obj):
    torch.save(obj, path)
    return path


def test_bad_checkpoint_through_the_vtab_cli(tmp_path, capsys):
    (tmp_path / "vim.pth").write_bytes(pickle.dumps({"model": {"w": [1, 2]}, "f": len}))
    write_fake_vtab(tmp_path, "dtd", classes=2, per_class=1, image_size=8)  # the data is fine: the checkpoint is not
    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "vim", "tiny.yaml")
    assert cli(["vtab", tiny, "--task", "dtd", "--set", f"model.checkpoint={tmp_path / 'vim.pth'}",
                "--set", f"data.root={tmp_path}", "--set", f"training.output_dir={tmp_path / 'out'}"]) == 2
    one_line_error(capsys, f"Vim checkpoint {tmp_path / 'vim.pth'} is not a weights file")


# --------------------------------------------------------------------------------------------------
# 10. non-finite and wrongly typed adapter tensors


def test_non_finite_adapter_is_refused_unless_allowed(tmp_path):
    model = lily_ssm.apply_adapter(tiny_mamba(layers=2), LilyConfig(targets=["in_proj"], r=2, num_A=1, num_B=2))
    randomise_adapter(model)
    with torch.no_grad():
        model.lily_ssm_adapter.pools["in_proj"].B.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 1.0])
    folder = lily_ssm.save_adapter(model, tmp_path / "adapter")
    base = tiny_mamba(layers=2)
    with pytest.raises(AdapterLoadError) as info:
        lily_ssm.load_adapter(base, folder)
    assert str(info.value).startswith(f"adapter tensor in_proj.B in {folder / WEIGHTS_NAME} holds 1 NaN and 1 "
                                      "infinite values")
    assert "allow_non_finite=True" in str(info.value) and not hasattr(base, "lily_ssm_adapter")
    with pytest.raises(AdapterLoadError, match="in_proj.B"):
        read_adapter(folder)
    lily_ssm.load_adapter(base, folder, allow_non_finite=True)
    assert torch.isnan(base.lily_ssm_adapter.pools["in_proj"].B).any()
    assert torch.isnan(read_adapter(folder, allow_non_finite=True)[1]["in_proj.B"]).any()


def rewrite_weights(folder, change_tensors, change_meta=lambda m: m):
    """Replace the weights file with ``change_tensors(tensors)`` and fix up its checksum."""
    meta = json.loads((folder / CONFIG_NAME).read_text())
    tensors = load_safetensors((folder / WEIGHTS_NAME).read_bytes())
    payload = save_safetensors(change_tensors(dict(tensors)))
    (folder / WEIGHTS_NAME).write_bytes(payload)
    meta = change_meta({**meta, "weights_sha256": hashlib.sha256(payload).hexdigest()})
    meta.pop("content_sha256", None)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def test_adapter_dtypes_are_checked(saved):
    rewrite_weights(saved, lambda t: {**t, "in_proj.B": t["in_proj.B"].to(torch.float16)})
    with pytest.raises(AdapterLoadError, match=f"adapter tensor in_proj.B in {saved / WEIGHTS_NAME} is float16, but "
                                               f"{CONFIG_NAME} records float32"):
        lily_ssm.load_adapter(tiny_mamba(layers=2), saved)
    rewrite_weights(saved, lambda t: {**t, "in_proj.B": t["in_proj.B"].to(torch.int32)},
                    lambda m: {**m, "tensors": {**m["tensors"], "in_proj.B": {**m["tensors"]["in_proj.B"],
                                                                              "dtype": "int32"}}})
    for load in (lambda: lily_ssm.load_adapter(tiny_mamba(layers=2), saved), lambda: read_adapter(saved)):
        with pytest.raises(AdapterLoadError, match="adapter tensor in_proj.B in .* is int32; adapter weights must be "
                                                   "a floating-point dtype"):
            load()


def test_content_hash_mismatch_is_refused(saved):
    edit_meta(saved, lambda m: {**m, "content_sha256": "0" * 64})
    with pytest.raises(AdapterLoadError, match="content hash .* differs from content_sha256"):
        read_adapter(saved)


# --------------------------------------------------------------------------------------------------
# 11. a merged LoRA adapter is not applied twice


def test_merged_adapter_is_not_loaded_again(tmp_path):
    from transformers import AutoModelForCausalLM

    model = lily_ssm.apply_adapter(tiny_mamba(layers=2), LoraConfig(targets=["in_proj"], r=2, alpha=4.0))
    randomise_adapter(model)
    folder = lily_ssm.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    merged = merge_adapter(model)
    assert merged.config.lily_ssm_merged == [meta["content_sha256"]]
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    before = {k: v.clone() for k, v in reloaded.state_dict().items()}
    with pytest.raises(AdapterLoadError) as info:
        lily_ssm.load_adapter(reloaded, folder)
    assert str(info.value).startswith(f"adapter {folder}: its weights were already merged into this model")
    assert "loading it again would apply it twice" in str(info.value)
    assert not hasattr(reloaded, "lily_ssm_adapter")
    assert all(torch.equal(v, before[k]) for k, v in reloaded.state_dict().items())
    with pytest.raises(AdapterLoadError, match="already merged"):
        lily_ssm.load_adapter(merged, folder)  # the in-memory merged model too
    lily_ssm.load_adapter(tiny_mamba(layers=2), folder)  # the original base is fine


def test_merge_record_without_a_config_stays_on_the_model(tmp_path):
    model = lily_ssm.apply_adapter(tiny_mamba(layers=2), LoraConfig(targets=["in_proj"], r=2, alpha=4.0))
    randomise_adapter(model)
    folder = lily_ssm.save_adapter(model, tmp_path / "adapter")
    config = model.config
    del model.config
    merge_adapter(model)
    assert model.lily_ssm_merged == [json.loads((folder / CONFIG_NAME).read_text())["content_sha256"]]
    model.config = config
    assert not hasattr(config, "lily_ssm_merged")


def test_config_files_still_load(tmp_path):
    assert load_config(config_file(tmp_path)).training.output_dir == str(tmp_path / "run")


def test_report_to_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from transformers.integrations import integration_utils

    assert parse_config(experiment(tmp_path)).training.report_to == "none"  # the default stays none
    with pytest.raises(ConfigError, match=r"training.report_to: unknown tracker 'tensorbord'; trackers: none, all, "
                                          r".*tensorboard.*wandb"):
        parse_config(experiment(tmp_path, report_to="tensorbord"))
    with pytest.raises(ConfigError, match=r"training.report_to=5; give none, all, or tracker names"):
        parse_config(experiment(tmp_path, report_to=5))
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"training.report_to: wandb is not installed \(pip install wandb\)"):
        parse_config(experiment(tmp_path, report_to=["wandb"]))
    assert cli(["train", str(config_file(tmp_path)), "--set", "training.report_to=wandb"]) == 2
    one_line_error(capsys, "wandb is not installed")
