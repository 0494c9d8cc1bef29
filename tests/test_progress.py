"""Readable progress: the line's format (step/total, bar, loss, lr, ETA), in place on a terminal and
plain lines elsewhere, and the Trainer's events reaching it without the raw dicts."""

from __future__ import annotations

import io
import json
import re

import pytest
from conftest import language_assets

from lily_ssm.config.experiment import parse_config
from lily_ssm.train.trainer import run_training
from lily_ssm.utils.progress import (
    ConsoleProgress,
    Progress,
    ProgressBoard,
    Snapshot,
    format_duration,
    format_number,
    render_eval,
    render_line,
)

RAW_DICT = re.compile(r"\{'(loss|train_runtime|eval_loss)'")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_durations_and_numbers():
    assert [format_duration(s) for s in (0, 45.4, 192, 3600 + 5 * 60 + 7)] == ["0s", "45s", "3m12s", "1h05m"]
    assert [format_number(v) for v in (1.23449, 12.5, 2e-4, 1.5e-5, 0.02, 0.0)] == \
        ["1.234", "12.5", "2e-4", "1.5e-5", "0.02", "0"]


def test_the_line_has_step_total_bar_loss_lr_and_eta():
    line = render_line(Snapshot("train", 120, 500, loss=1.2341, lr=2e-4, eta=192))
    assert line == "train  120/500 [##........]  loss 1.234  lr 2e-4  ETA 3m12s"
    assert render_line(Snapshot("train", 0, 500)) == "train    0/500 [..........]  ETA ?"
    done = render_line(Snapshot("lily-in", 500, 500, loss=0.5, status="evaluating"), label_width=10)
    assert done == "lily-in     500/500 [##########]  loss 0.5  evaluating"
    assert render_eval(Snapshot("eurosat", 40, 80, metrics={"test_accuracy": 0.4125})) == \
        "eurosat  eval at 40/80  test_accuracy 0.4125"


def test_eta_is_timed_from_the_first_step_seen():
    shown: list[Snapshot] = []
    clock = Clock()
    progress = Progress("train", shown.append, clock=clock)
    progress.begin(100, step=40)  # resumed at step 40
    clock.now = 50.0  # the first step after resuming (and any warm-up) is not the pace
    progress.update(41)
    assert shown[-1].eta is None
    clock.now = 60.0
    progress.update(51, loss=2.0, lr=1e-3, logged=True)
    assert shown[-1].eta == pytest.approx(49.0) and shown[-1].kind == "log"  # 1 s per step, 49 steps left
    progress.update(52)
    assert shown[-1].loss == 2.0 and shown[-1].lr == 1e-3  # logged values stay until the next log


def test_console_plain_prints_logged_steps_evals_and_the_end_once():
    lines: list[str] = []
    progress = Progress("train", ConsoleProgress(stream=io.StringIO(), log=lines.append), clock=Clock())
    progress.begin(4)
    for step in range(1, 5):
        progress.update(step)
        if step % 2 == 0:
            progress.update(step, loss=1.0 / step, lr=1e-2, logged=True)
    progress.evaluated({"eval_loss": 0.7})
    progress.end()  # the last log already said 4/4
    assert lines == ["train  2/4 [#####.....]  loss 0.5  lr 0.01  ETA 0s",  # the clock stands still
                     "train  4/4 [##########]  loss 0.25  lr 0.01",
                     "train  eval at 4/4  eval_loss 0.7"]


def test_console_on_a_terminal_redraws_one_line_in_place():
    terminal, lines, clock = Terminal(), [], Clock()
    progress = Progress("train", ConsoleProgress(stream=terminal, log=lines.append, clock=clock), clock=clock)
    progress.begin(3)
    for step in (1, 2, 3):
        clock.now += 1
        progress.update(step, loss=1.0, lr=1e-2, logged=step == 3)
    progress.end()
    text = terminal.getvalue()
    assert not lines  # nothing through the plain path
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, finished at the end
    assert text.rstrip("\n").split("\r")[-1].startswith("train  3/3 [##########]  loss 1  lr 0.01")


def test_board_keeps_one_live_line_per_running_arm_and_prints_the_finished_ones():
    terminal, clock = Terminal(), Clock()
    board = ProgressBoard(["a-long-name", "b"], stream=terminal, clock=clock)
    board.start("a-long-name")
    board.start("b")
    board.show(Snapshot("b", 1, 4, loss=2.0, kind="log"))
    board.finish("a-long-name", "accuracy 41.0%")
    screen = _screen(terminal.getvalue())
    assert screen == ["a-long-name  accuracy 41.0%", "b            1/4 [##........]  loss 2  ETA ?"]

    plain: list[str] = []
    board = ProgressBoard(["a", "b"], stream=io.StringIO(), log=plain.append)
    board.start("a")
    board.show(Snapshot("a", 1, 4))  # a step alone prints nothing in a log
    board.show(Snapshot("a", 2, 4, loss=1.0, kind="log"))
    board.finish("a", "accuracy 50.0%")
    assert plain == ["a  2/4 [#####.....]  loss 1  ETA ?", "a  accuracy 50.0%"]


def _screen(text: str) -> list[str]:
    """What a terminal shows after ``text`` (the few escapes the board writes)."""
    rows, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[(\d*)([FK])|(\r)|(\n)|([^\x1b\r\n]+)", text):
        count, code, cr, nl, chars = token
        if code == "F":
            row, col = max(0, row - int(count or 1)), 0
        elif code == "K":
            rows[row] = rows[row][:col]
        elif cr:
            col = 0
        elif nl:
            row, col = row + 1, 0
            rows += [""] * (row + 1 - len(rows))
        else:
            rows[row] = rows[row][:col] + chars + rows[row][col + len(chars):]
            col += len(chars)
    return [r for r in rows if r]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return language_assets(tmp_path_factory.mktemp("progress-assets"), train_per_task=4, test_per_task=1)


def _experiment(assets, out, **training):
    return {"model": {"name_or_path": assets["base"], "dtype": "float32"},
            "adapter": {"method": "lily", "targets": ["in_proj"], "r": 4, "num_A": 2, "num_B": 2},
            "data": {"train_file": assets["train_file"], "cutoff_len": 64, "val_set_size": 4, "protocol": "clean"},
            "training": {"output_dir": str(out), "max_steps": 4, "batch_size": 4, "micro_batch_size": 4,
                         "learning_rate": 1e-2, "warmup_steps": 0, "save_steps": 2, "eval_steps": 2,
                         "logging_steps": 2, **training}}


def test_training_prints_progress_lines_not_the_trainers_dicts(assets, tmp_path, capsys):
    lines: list[str] = []
    run_training(parse_config(_experiment(assets, tmp_path / "run")), log=lambda m="": lines.append(str(m)))
    captured = capsys.readouterr()
    assert not RAW_DICT.search(captured.out + captured.err + "\n".join(lines))
    progress = [line for line in lines if line.startswith("train  ")]
    assert re.fullmatch(r"train  2/4 \[#####\.\.\.\.\.\]  loss \S+  lr \S+  ETA \S+", progress[0])
    assert any(re.fullmatch(r"train  eval at 2/4  eval_loss \S+", line) for line in progress)
    assert re.fullmatch(r"train  eval at 4/4  eval_loss \S+", progress[-1])
    assert sum(bool(re.fullmatch(r"train  4/4 \[##########\]  loss \S+  lr \S+", line)) for line in progress) == 1


def test_report_to_still_gets_every_metric(assets, tmp_path):
    pytest.importorskip("tensorboard")
    from transformers import TrainerCallback

    from lily_ssm.train import trainer as trainer_module

    received: list[dict] = []

    class Tracker(TrainerCallback):  # stands for any report_to integration: they are callbacks too
        def on_log(self, args, state, control, logs=None, **kwargs):
            received.append(dict(logs or {}))

    original = trainer_module.AdapterTrainer.__init__

    def with_tracker(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Tracker())
        with_tracker.trainer = self

    trainer_module.AdapterTrainer.__init__ = with_tracker
    try:
        out = tmp_path / "run"
        run_training(parse_config(_experiment(assets, out, report_to="tensorboard")), log=lambda *_: None)
    finally:
        trainer_module.AdapterTrainer.__init__ = original
    trainer = with_tracker.trainer
    names = {type(c).__name__ for c in trainer.callback_handler.callbacks}
    assert "TensorBoardCallback" in names and "ShowProgress" in names
    assert not names & {"PrinterCallback", "ProgressCallback"}
    assert [r["loss"] for r in received if "loss" in r] == [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert sum("eval_loss" in r for r in received) == 2 and any("train_runtime" in r for r in received)
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard wrote its event file
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in logged) == 2
