"""Settings a user can discover: ``lily-ssm config`` lists exactly the keys the validator accepts, with defaults it
accepts; ``--help`` points to it and explains ``--set`` (which reaches into mappings); VTAB data has a documented
layout and a one-command stand-in."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from lily_ssm.ablation.config import PER_ARM, AblationSection, load_ablation, section_classes
from lily_ssm.cli import main as cli
from lily_ssm.config import experiment, vtab
from lily_ssm.config.experiment import load_config
from lily_ssm.config.vtab import load_vtab_config
from lily_ssm.data.vtab import NUM_CLASSES, TASKS, VTabDataset, read_list_file
from lily_ssm.tuners import CONFIG_CLASSES
from lily_ssm.utils.sections import ConfigError, apply_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROW = re.compile(r"^  (\S+)\s+(.*?)\s{2,}(\S.*)$")  # key, default (may hold single spaces), meaning


def printed(capsys, kind: str) -> dict[str, list[tuple[str, str]]]:
    """``lily-ssm config <kind>``'s rows, ``(key, default)`` by group heading."""
    assert cli(["config", kind]) == 0
    groups: dict[str, list[tuple[str, str]]] = {}
    heading = None
    for line in capsys.readouterr().out.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            heading = line[:-1]
            groups[heading] = []
        elif line.startswith("  "):
            match = ROW.match(line)
            assert match and heading, line
            groups[heading].append((match[1], match[2]))
    return groups


def keys(sections: dict[str, type], skip: frozenset = frozenset()) -> set[str]:
    return {f"{name}.{f.name}" for name, cls in sections.items() for f in fields(cls)} - skip


def adapter_keys(method: str, extra: tuple[str, ...] = ()) -> set[str]:
    return {"adapter.method", *(f"adapter.{f.name}" for f in fields(CONFIG_CLASSES[method])),
            *(f"adapter.{k}" for k in extra)}


def by_heading(groups, word: str) -> set[str]:
    return {key for heading, rows in groups.items() if word in heading for key, _ in rows}


# What the validator accepts, from its own tables; and a config file it accepts, to try each printed default on.
ACCEPTED = {
    "train": {"lily": keys(experiment.SECTIONS) | adapter_keys("lily"),
              "lora": keys(experiment.SECTIONS) | adapter_keys("lora")},
    "vtab": {"lily": keys(vtab.SECTIONS) | adapter_keys("lily", ("per_task",)),
             "lora": keys(vtab.SECTIONS) | adapter_keys("lora", ("per_task",))},
    "ablate": {path: keys({"ablation": AblationSection, **section_classes(path)}, frozenset(PER_ARM))
               for path in ("language", "vim")},
}
BASES = {"train": {"lily": CONFIGS / "tiny" / "lily_in.yaml", "lora": CONFIGS / "tiny" / "lora_dt_in.yaml"},
         "vtab": {"lily": CONFIGS / "vim" / "tiny.yaml", "lora": CONFIGS / "vim" / "lora.yaml"},
         "ablate": {"language": CONFIGS / "ablation" / "tiny.yaml", "vim": CONFIGS / "ablation" / "vim_s.yaml"}}
LOADERS = {"train": load_config, "vtab": load_vtab_config, "ablate": load_ablation}


def variant_rows(groups, kind: str, variant: str, section_defaults: bool = False) -> list[tuple[str, str]]:
    """The printed rows that apply to one method (train, vtab) or one ablation path (ablate); with
    ``section_defaults``, the ablation section's rows only for its default path (language)."""
    if kind == "ablate":
        return [row for heading, rows in groups.items() for row in rows
                if (heading == "ablation" and not (section_defaults and variant != "language"))
                or f"ablation.path: {variant}" in heading]
    return [row for heading, rows in groups.items() for row in rows
            if not heading.startswith("adapter") or f"method: {variant}" in heading]


@pytest.mark.parametrize("kind", ["train", "vtab", "ablate"])
def test_config_prints_exactly_the_keys_the_validator_accepts(kind, capsys):
    groups = printed(capsys, kind)
    for variant, accepted in ACCEPTED[kind].items():
        shown = {key for key, _ in variant_rows(groups, kind, variant)}
        assert shown == accepted, f"{kind} ({variant}): printed but refused {shown - accepted}, " \
                                  f"accepted but not printed {accepted - shown}"


@pytest.mark.parametrize("kind", ["train", "vtab", "ablate"])
def test_every_printed_default_is_accepted_through_set(kind, capsys, tmp_path):
    """Each printed key, set with --set to its printed default on a shipped config, loads; an unknown key does not,
    and its error points to lily-ssm config."""
    groups = printed(capsys, kind)
    load = LOADERS[kind]
    out = [] if kind == "ablate" else [f"training.output_dir={tmp_path / 'run'}"]
    for variant, base in BASES[kind].items():
        rows = variant_rows(groups, kind, variant, section_defaults=True)
        assert rows
        for key, default in rows:
            if default == "(required)":
                continue
            try:
                load(base, [*out, f"{key}={default}"])
            except ConfigError as exc:
                pytest.fail(f"lily-ssm config {kind} prints {key} = {default}, which --set refuses: {exc}")
        section = "ablation" if kind == "ablate" else "training"
        with pytest.raises(ConfigError, match=f"unknown key.*{section}.no_such_key.*lily-ssm config"):
            load(base, [*out, f"{section}.no_such_key=1"])
    if kind != "ablate":
        with pytest.raises(ConfigError, match="unknown lily config field.*no_such_key.*lily-ssm config"):
            load(BASES[kind]["lily"], [*out, "adapter.no_such_key=1"])


def test_config_without_a_kind_prints_all_three(capsys):
    assert cli(["config"]) == 0
    out = capsys.readouterr().out
    assert all(f"lily-ssm {kind} CONFIG.yaml" in out for kind in ("train", "vtab", "ablate"))


@pytest.mark.parametrize("command", ["train", "vtab", "ablate"])
def test_help_points_to_config_and_explains_set(command, capsys):
    with pytest.raises(SystemExit):
        cli([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"lily-ssm config {command}" in out
    assert "--set section.key=value" in out and "read as YAML" in out and "adapter.overrides.dt_proj.r=4" in out
    if command == "vtab":
        assert "train800val200.txt" in out and "'<image path> <label>'" in out and "lily-ssm fake-vtab" in out
        assert all(task in out for task in TASKS)  # the CLI spells the 19 names out without importing data.vtab


def test_eval_commonsense_help_names_the_builtin_data(capsys):
    with pytest.raises(SystemExit):
        cli(["eval-commonsense", "--help"])
    assert "builtin:synthetic-commonsense" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# --set reaching into mappings


def test_set_reaches_into_mappings_the_file_holds():
    raw = {"adapter": {"r": 4, "overrides": {"dt_proj": {"r": 2}, "in_proj.x": {"r": 8}}}, "model": {}}
    apply_overrides(raw, ["adapter.overrides.dt_proj.r=4", "adapter.overrides.dt_proj.num_B=1",
                          "adapter.overrides.in_proj.x.r=16", "adapter.overrides.x_proj={r: 1}", "adapter.r=3",
                          "model.name_or_path=m"], "exp.yaml", ("model", "adapter"))
    assert raw == {"adapter": {"r": 3, "overrides": {"dt_proj": {"r": 4, "num_B": 1}, "in_proj.x": {"r": 16},
                                                     "x_proj": {"r": 1}}}, "model": {"name_or_path": "m"}}


@pytest.mark.parametrize("item, error", [
    ("adapter.r.x=3", "adapter.r is 4, not a mapping to reach into"),
    ("adapter.overrides.in_proj.r=4", "adapter.overrides has no key 'in_proj' to reach into .keys there: dt_proj.; "
                                      "set the whole mapping as YAML instead, e.g. --set 'adapter.overrides.in_proj="
                                      "{r: 4}'"),
    ("adapter.routers.a.b=1", "adapter has no key 'routers'"),
    ("adapter.r=[1", "the value is not valid YAML"),
])
def test_set_into_what_is_not_there_is_one_clear_error(item, error):
    raw = {"adapter": {"r": 4, "overrides": {"dt_proj": {"r": 2}}}}
    with pytest.raises(ConfigError, match=error):
        apply_overrides(raw, [item], "exp.yaml", ("adapter",))


def test_set_into_a_shipped_config(tmp_path):
    config = load_vtab_config(CONFIGS / "vim" / "tiny.yaml", ["adapter.overrides.dt_proj.r=1",
                                                              "model.overrides.depth=2"])
    assert config.adapter["overrides"]["dt_proj"] == {"r": 1, "num_B": 1} and config.model.overrides["depth"] == 2


# --------------------------------------------------------------------------------------------------
# VTAB stand-in data


def test_fake_vtab_writes_every_task_in_the_layout_vtab_reads(tmp_path, capsys):
    root = tmp_path / "vtab-1k"
    assert cli(["fake-vtab", str(root), "--per-class", "1", "--image-size", "8"]) == 0  # all 19, 2-class ones too
    assert f"written to {root}/" in capsys.readouterr().out
    for task in TASKS:
        labels = {label for _, label in read_list_file(root / task / "test.txt", NUM_CLASSES[task])}
        assert labels == set(range(min(3, NUM_CLASSES[task]))), task
        assert len(VTabDataset(str(root), task, "train800val200", image_size=8)) == 2 * len(labels)


def test_fake_vtab_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert cli(["fake-vtab", str(tmp_path), "--tasks", "eurosat,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown VTAB task(s) nope; tasks: caltech101" in err
    assert cli(["fake-vtab", str(tmp_path), "--tasks", "eurosat,patch_camelyon", "--classes", "3"]) == 2
    assert "--classes 3 is more than patch_camelyon has (2); give at most 2" in capsys.readouterr().err
    assert not (tmp_path / "eurosat").exists()  # every task is checked before anything is written


@pytest.mark.parametrize("config", ["vim/lily_l.yaml", "vim/lily_s.yaml", "vim/lora.yaml", "vim/tiny.yaml",
                                    "vit/lily.yaml", "vit/tiny.yaml", "ablation/vim_s.yaml", "ablation/vit_b.yaml"])
def test_vtab_configs_say_how_to_lay_out_or_fake_the_data(config):
    header = "".join(line for line in (CONFIGS / config).read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "train800val200" in header and "<label>" in header and "lily-ssm fake-vtab vtab-1k" in header
    assert "write_fake_vtab" not in header
