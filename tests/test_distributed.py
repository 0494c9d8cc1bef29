"""Data-parallel training: `torchrun --nproc_per_node 2` on CPU (gloo) trains the adapter a one-process
run with the same effective batch trains, and only rank 0 writes into the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import language_assets
from safetensors.torch import load_file

from lily_ssm.config.experiment import parse_config
from lily_ssm.train.trainer import run_training

# Run as the torchrun entry point: record every file a rank opens for writing or renames into the run
# folder, then hand over to the real command line.
ENTRY = textwrap.dedent('''
    import builtins, os, sys
    record_dir, out = sys.argv.pop(1), os.path.abspath(sys.argv.pop(1))
    record = open(os.path.join(record_dir, f"writes-{os.environ['RANK']}.txt"), "w")
    real = {"replace": os.replace, "rename": os.rename, "open": os.open, "builtin": builtins.open}

    def note(kind, path):
        path = os.path.abspath(os.fspath(path))
        if path.startswith(out):
            record.write(f"{kind} {os.path.relpath(path, out)}\\n")
            record.flush()

    def replace(src, dst, *a, **k):
        note("replace", dst)
        return real["replace"](src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        note("rename", dst)
        return real["rename"](src, dst, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR):
            note("open", path)
        return real["open"](path, flags, *a, **k)

    def builtin_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            note("open", file)
        return real["builtin"](file, mode, *a, **k)

    os.replace, os.rename, os.open, builtins.open = replace, rename, os_open, builtin_open
    from lily_ssm.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _experiment(assets, out, micro_batch_size):
    return {"model": {"name_or_path": assets["base"], "dtype": "float32"},
            "adapter": {"method": "lily", "targets": ["in_proj", "dt_proj"], "r": 4, "num_A": 1, "num_B": 2},
            "data": {"train_file": assets["train_file"], "cutoff_len": 96, "val_set_size": 0, "protocol": "clean",
                     "train_on_inputs": False},
            "training": {"output_dir": str(out), "max_steps": 6, "batch_size": 8, "micro_batch_size": micro_batch_size,
                         "learning_rate": 1e-2, "warmup_steps": 0, "save_steps": 3, "logging_steps": 1,
                         "progress_bar": False}}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_processes_train_the_one_process_adapter_and_only_rank_0_writes(tmp_path):
    assets = language_assets(tmp_path / "assets")
    # one process: micro-batches of 4, two accumulated per step
    run_training(parse_config(_experiment(assets, tmp_path / "one", 4)), log=lambda *_: None)
    # two processes: micro-batches of 4 on each, one per step
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(_experiment(assets, tmp_path / "two", 4)))
    (tmp_path / "entry.py").write_text(ENTRY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "entry.py"), str(tmp_path), str(tmp_path / "two"), "train", str(config)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("adapter written to") == 1  # reported once, by rank 0

    one, two = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two"))
    assert set(one) == set(two)
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-4
    assert any(one[k].abs().sum() > 0 for k in one if k.endswith(".B"))  # it trained (B starts at zero)

    rank0 = (tmp_path / "writes-0.txt").read_text().split("\n")
    rank1 = [line for line in (tmp_path / "writes-1.txt").read_text().split("\n") if line]
    assert any(line.endswith("adapter_model.safetensors") for line in rank0)
    assert any(line.endswith("train_log.jsonl") for line in rank0)
    # rank 1 writes nothing but the RNG state transformers keeps per process in each checkpoint
    assert all(os.path.basename(line.split(" ", 1)[1]) == "rng_state_1.pth" for line in rank1), rank1
    assert (tmp_path / "two" / "checkpoint-6" / "rng_state_1.pth").is_file()
    logged = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once
    assert torch.tensor([r["loss"] for r in logged if "loss" in r]).isfinite().all()
