"""Running an ablation: each arm trains and is tested in its own process, one after another or
``workers`` at a time; finished arms are skipped on a rerun; the table is rewritten after every arm.

Layout of ``ablation.output_dir``::

    plan.json                the arms with their sized adapters
    <arm>/arm.json           what the arm runs (a rerun with other settings is refused)
    <arm>/result.json        written when the arm has finished: the arm is then skipped
    <arm>/failure.json       the error of a failed attempt (the arm runs again on the next run)
    <arm>/log.txt            the arm's progress
    <arm>/adapter/ or <arm>/<task>/   the trained adapter(s); <arm>/eval/ the predictions
    results.csv, results.json, summary.md
    .lock                    flock-ed by the running ``ablate`` (one per folder at a time)

Each arm runs in a fresh process so its peak memory (peak RSS of that process; peak CUDA memory
when on a GPU) is its own. The console shows one progress line per arm (step/total, loss, ETA, then its
score); everything an arm's process prints goes to its ``log.txt`` (:mod:`.processes`). A Ctrl-C stops
every arm and says, in one line, how many are unfinished: the same command continues them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..utils.atomic import write_atomic
from ..utils.lock import folder_lock
from ..utils.progress import ConsoleProgress, ProgressBoard, Snapshot
from ..utils.sections import ConfigError
from .arms import Arm, describe_arm, plan_arms
from .config import AblationConfig
from .processes import Job, run_jobs

RESULT_NAME = "result.json"
ARM_NAME = "arm.json"
FAILURE_NAME = "failure.json"
LOG_NAME = "log.txt"


class AblationInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the arms; the message says how many are unfinished and how to continue them."""


def arm_spec(config: AblationConfig, arm: Arm) -> dict[str, Any]:
    """Everything an arm's result depends on; a finished arm is reused only if this is unchanged."""
    return {"path": config.ablation.path, "arm": arm.to_dict(), "sections": config.sections,
            "tasks": config.ablation.tasks}


def _training_part(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of a spec its checkpoints depend on (the evaluation settings can change freely)."""
    return {**spec, "sections": {k: v for k, v in spec["sections"].items() if k != "evaluation"}}


def run_ablation(config: AblationConfig, log: Any = print, dry_run: bool = False) -> dict[str, Any]:
    """Plan the arms, run those not finished yet, and write the tables; returns the table rows."""
    ablation = config.ablation
    check_data(config)  # a missing input should not cost planning (a model build) or a training run per arm
    arms = plan_arms(config)
    out = Path(ablation.output_dir)
    log(f"{len(arms)} arms at a budget of {ablation.budget:,} adapter parameters (±{ablation.tolerance:.0%}):")
    for arm in arms:
        log("  " + describe_arm(arm))
    if dry_run:
        return {"arms": [arm.to_dict() for arm in arms], "rows": []}
    with folder_lock(out, "lily-ssm ablate"):
        return _run_arms(config, arms, out, log)


def _run_arms(config: AblationConfig, arms: list[Arm], out: Path, log: Any) -> dict[str, Any]:
    write_atomic(out / "plan.json", json.dumps([arm.to_dict() for arm in arms], indent=1) + "\n")
    workers = config.ablation.workers
    results: dict[str, dict[str, Any]] = {}
    payloads: list[dict[str, Any]] = []
    earlier: dict[str, list[str]] = {"done, skipped": [], "evaluating again": [], "continuing": [], "starting": []}
    for arm in arms:
        spec, folder = arm_spec(config, arm), out / arm.name
        _check_reuse(folder, spec, config.source)
        finished = _read_json(folder / RESULT_NAME) if (folder / RESULT_NAME).is_file() else None
        if finished is not None and finished.get("spec") == spec:
            results[arm.name] = finished
            earlier["done, skipped"].append(arm.name)
            continue
        if finished is not None:  # new evaluation settings: trained already, evaluated again
            (folder / RESULT_NAME).unlink()
        earlier["evaluating again" if finished else "continuing" if (folder / LOG_NAME).is_file()
                else "starting"].append(arm.name)
        write_atomic(folder / ARM_NAME, json.dumps({"spec": spec}, indent=1) + "\n")
        payloads.append({"arm": arm.to_dict(), "spec": spec, "folder": str(folder), "workers": workers})
    if any(earlier[kind] for kind in ("done, skipped", "evaluating again", "continuing")):
        log("rerun: " + "; ".join(f"{kind}: {', '.join(names)}" for kind, names in earlier.items() if names))

    if payloads:
        log(f"running {len(payloads)} arm(s), {workers} at a time (logs in <arm>/{LOG_NAME})")
    board = ProgressBoard([p["arm"]["name"] for p in payloads], log=log)
    start = time.perf_counter()
    try:
        with contextlib.closing(_run_processes(payloads, workers, board)) as ended:
            for done, (name, result) in enumerate(ended, 1):
                results[name] = result
                status = f"{100 * result['accuracy']:.1f}% accuracy, {result['train_seconds']:.0f}s training" \
                    if result["status"] == "finished" else f"FAILED: {result['error']}"
                board.finish(name, f"[{done}/{len(payloads)}] {status} ({time.perf_counter() - start:.0f}s elapsed)")
                write_tables(config, arms, results)
    except KeyboardInterrupt:
        board.close()
        unfinished = [p["arm"]["name"] for p in payloads if p["arm"]["name"] not in results]
        raise AblationInterrupted(f"{len(unfinished)} arm(s) unfinished; rerun the same command to continue "
                                  f"{'it' if len(unfinished) == 1 else 'them'}") from None
    rows = write_tables(config, arms, results)
    log("\n" + (out / "summary.md").read_text())
    failed = [name for name, r in results.items() if r["status"] != "finished"]
    if failed:
        log(f"{len(failed)} arm(s) failed: {', '.join(failed)}; see <arm>/{LOG_NAME}. Fix the cause and rerun: "
            "finished arms are skipped and unfinished ones resume from their checkpoints")
    return {"arms": [arm.to_dict() for arm in arms], "rows": rows, "failed": failed}


def check_data(config: AblationConfig) -> None:
    """Raise naming the first input the arms would miss (model, checkpoint or data); loads nothing."""
    sections = config.sections
    if config.ablation.path == "language":
        from ..config.experiment import check_experiment_inputs
        from ..data.prompts import resolve_tasks
        from ..evaluation.commonsense import task_test_file

        check_experiment_inputs(sections["model"], sections["data"], config.source)
        for task in resolve_tasks(sections["evaluation"]["tasks"]):
            task_test_file(sections["evaluation"]["data_root"], task)
        return
    from ..config.vtab import check_vtab_inputs

    check_vtab_inputs(sections["model"], sections["data"]["root"], config.ablation.tasks or [], config.source)


def _check_reuse(folder: Path, spec: dict[str, Any], source: str) -> None:
    """Refuse a folder whose result or checkpoints come from other training settings (an arm that
    failed before saving anything may be rerun with new ones)."""
    has_checkpoints = any(folder.rglob("checkpoint-*")) or any(folder.rglob("train_state.json"))
    for name, binding in ((RESULT_NAME, True), (ARM_NAME, has_checkpoints)):
        path = folder / name
        if binding and path.is_file() and \
                _training_part(_read_json(path).get("spec") or {"sections": {}}) != _training_part(spec):
            raise ConfigError(f"{path} was written for other training settings than {source} now gives; use another "
                              f"ablation.output_dir, or delete {folder} to run the arm again")


def _run_processes(payloads: list[dict[str, Any]], workers: int,
                   board: ProgressBoard | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run each payload in a fresh process, ``workers`` at a time, its progress on ``board``; yield
    ``(arm name, result)`` as they end. A process that dies (e.g. killed for memory) fails its own arm only."""
    jobs = []
    for payload in payloads:
        folder = Path(payload["folder"])
        (folder / FAILURE_NAME).unlink(missing_ok=True)
        jobs.append(Job(payload["arm"]["name"], payload, folder / LOG_NAME))

    def show(name: str, snapshot: Snapshot) -> None:
        if board is not None:
            board.show(replace(snapshot, label=name))  # a vim arm's snapshots are labelled with its task

    for name, exitcode in run_jobs(jobs, workers, run_arm_process, show, board.start if board else lambda _: None):
        folder = next(Path(job.payload["folder"]) for job in jobs if job.name == name)
        if (folder / RESULT_NAME).is_file():
            yield name, _read_json(folder / RESULT_NAME)
        elif (folder / FAILURE_NAME).is_file():
            yield name, _read_json(folder / FAILURE_NAME)
        else:
            yield name, {"status": "failed", "error": f"the arm's process exited with code {exitcode} "
                                                      "(killed, e.g. out of memory?)"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); delete it to run the arm again") from exc


# ---------------------------------------------------------------------------------------------------
# One arm, in its own process


def run_arm_process(payload: dict[str, Any], show: Callable[[Snapshot], None]) -> None:
    """Entry point of an arm's process (its output is its ``log.txt``): run the arm and write
    ``result.json``, or ``failure.json`` if it fails; progress goes to ``show`` and to the log."""
    folder = Path(payload["folder"])
    workers = payload["workers"]
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    progress = _ArmProgress(show, ConsoleProgress(log=print))
    arm = Arm(**{**payload["arm"], "targets": tuple(payload["arm"]["targets"]),
                 "notes": tuple(payload["arm"]["notes"])})
    try:
        print(f"== {describe_arm(arm)}")
        result = run_arm(arm, payload["spec"], folder, print, progress)
        write_atomic(folder / RESULT_NAME, json.dumps(result, indent=1) + "\n")
    except Exception as exc:  # reported in the table; the arm is retried on the next run
        print(traceback.format_exc())
        failure = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        write_atomic(folder / FAILURE_NAME, json.dumps(failure, indent=1) + "\n")


class _ArmProgress:
    """An arm's progress: to the parent's board and, as plain lines, to the arm's log."""

    def __init__(self, *displays: Callable[[Snapshot], None]) -> None:
        self.displays, self.last = displays, None

    def __call__(self, snapshot: Snapshot) -> None:
        self.last = snapshot if snapshot.kind != "eval" else self.last
        for display in self.displays:
            display(snapshot)

    def status(self, text: str) -> None:
        if self.last is not None:
            self(replace(self.last, kind="status", status=text))


def run_arm(arm: Arm, spec: dict[str, Any], folder: Path, log: Any = print,
            progress: Callable[[Snapshot], None] | None = None) -> dict[str, Any]:
    """Train and test one arm (resuming its own checkpoints); returns its result row data."""
    sections = spec["sections"]
    if spec["path"] == "language":
        accuracy, per_task, train_seconds = _run_language(arm, sections, folder, log, progress)
    else:
        accuracy, per_task, train_seconds = _run_vim(arm, sections, spec["tasks"], folder, log, progress)
    return {"status": "finished", "spec": spec, "accuracy": accuracy, "per_task": per_task,
            "train_seconds": round(train_seconds, 3), **_peak_memory_mb()}


def _run_language(arm: Arm, sections: dict[str, Any], folder: Path, log: Any,
                  progress: Callable[[Snapshot], None] | None) -> tuple[float, dict[str, float], float]:
    from ..config.experiment import parse_config
    from ..evaluation.commonsense import evaluate_commonsense
    from ..train.trainer import run_training, training_seconds

    training = {**sections["training"], "output_dir": str(folder / "adapter"), "resume": "auto"}
    raw = {"model": sections["model"], "adapter": arm.adapter, "data": sections["data"], "training": training}
    trained = run_training(parse_config(raw, source=f"arm {arm.name}"), log=log, show_progress=progress)
    if trained["model"] is None:  # trained earlier (its evaluation is what runs again): load what it wrote
        from ..models.loading import load_model_and_tokenizer
        from ..persistence import load_adapter

        model = sections["model"]
        trained["model"], trained["tokenizer"] = load_model_and_tokenizer(
            model["name_or_path"], model["dtype"], model["device_map"], model["tokenizer"], model["trust_remote_code"])
        load_adapter(trained["model"], trained["adapter"])
    if isinstance(progress, _ArmProgress):
        progress.status("evaluating")
    ev = sections["evaluation"]
    results = evaluate_commonsense(trained["model"], trained["tokenizer"], ev["data_root"], ev["tasks"],
                                   ev["batch_size"], ev["num_beams"], ev["max_new_tokens"], ev["limit"],
                                   output_dir=folder / "eval", log=log, protocol=sections["data"]["protocol"])
    per_task = {task: r["accuracy"] for task, r in results["tasks"].items()}
    return results["average"], per_task, training_seconds(Path(trained["log"]))


def _run_vim(arm: Arm, sections: dict[str, Any], tasks: list[str], folder: Path, log: Any,
             progress: Callable[[Snapshot], None] | None) -> tuple[float, dict[str, float], float]:
    from ..config.vtab import VtabDataSection, VtabExperiment, VtabModelSection, VtabTrainingSection
    from ..train.vtab import run_vtab_task

    experiment = VtabExperiment(
        model=VtabModelSection(**sections["model"]), adapter=arm.adapter, data=VtabDataSection(**sections["data"]),
        training=VtabTrainingSection(**{**sections["training"], "output_dir": str(folder)}), source=f"arm {arm.name}")
    per_task, seconds = {}, 0.0
    for task in tasks:
        result = run_vtab_task(experiment, task, log=log, show_progress=progress)
        per_task[task] = result["test_accuracy"]
        seconds += result["train_seconds"]
    return sum(per_task.values()) / len(per_task), per_task, seconds


def _peak_memory_mb() -> dict[str, float | None]:
    import resource

    import torch

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": round(rss_kb / 1024, 1), "peak_cuda_mb": round(cuda, 1) if cuda is not None else None}


# ---------------------------------------------------------------------------------------------------
# Tables

_COLUMNS = ("arm", "method", "target_set", "targets", "routing", "r", "num_A", "num_B", "parameters",
            "budget_deviation_pct", "accuracy_pct", "train_seconds", "peak_rss_mb", "peak_cuda_mb", "status")


def table_rows(arms: list[Arm], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm, in plan order (arms not run yet have status ``pending``)."""
    rows = []
    for arm in arms:
        r = results.get(arm.name, {"status": "pending"})
        finished = r["status"] == "finished"
        row = {"arm": arm.name, "method": arm.method, "target_set": arm.target_set, "targets": " ".join(arm.targets),
               "routing": arm.routing or "", "r": arm.adapter["r"], "num_A": arm.adapter.get("num_A", ""),
               "num_B": arm.adapter.get("num_B", ""), "parameters": arm.parameters,
               "budget_deviation_pct": round(100 * arm.deviation, 2),
               "accuracy_pct": round(100 * r["accuracy"], 2) if finished else "",
               "train_seconds": r["train_seconds"] if finished else "",
               "peak_rss_mb": r["peak_rss_mb"] if finished else "",
               "peak_cuda_mb": (r["peak_cuda_mb"] or "") if finished else "",
               "status": r["status"] if finished or r["status"] == "pending" else f"failed: {r['error']}"}
        for task, value in (r.get("per_task") or {}).items():
            row[f"acc_{task}"] = round(100 * value, 2)
        rows.append(row)
    return rows


def write_tables(config: AblationConfig, arms: list[Arm], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``results.csv``, ``results.json`` and ``summary.md`` in the output folder; returns the rows."""
    a, out = config.ablation, Path(config.ablation.output_dir)
    rows = table_rows(arms, results)
    columns = list(_COLUMNS) + sorted({k for row in rows for k in row if k.startswith("acc_")})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "results.csv", buffer.getvalue())
    meta = {"path": a.path, "budget": a.budget, "tolerance": a.tolerance, "source": config.source}
    write_atomic(out / "results.json", json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    write_atomic(out / "summary.md", summary_markdown(config, arms, rows))
    return rows


def summary_markdown(config: AblationConfig, arms: list[Arm], rows: list[dict[str, Any]]) -> str:
    ablation = config.ablation
    measure = "commonsense accuracy (average over tasks)" if ablation.path == "language" else \
        f"VTAB-1K test accuracy (mean over {', '.join(ablation.tasks or [])})"
    done = [row["accuracy_pct"] for row in rows if row["accuracy_pct"] != ""]
    best = max(done) if done else None
    cuda = any(row["peak_cuda_mb"] != "" for row in rows)
    peak = ("peak CUDA memory allocated by the arm's process" if cuda else "the peak RSS of the arm's process")
    lines = [f"# Ablation: {config.source}", "",
             f"Budget {ablation.budget:,} adapter parameters per arm (±{ablation.tolerance:.0%}); accuracy is "
             f"{measure}; peak MB is {peak}.", "",
             "| arm | targets | routing | r | A / B | parameters | vs budget | accuracy (%) | train (s) | peak MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        experts = f"{row['num_A']} / {row['num_B']}" if row["num_A"] != "" else ""
        acc = "" if row["accuracy_pct"] == "" else f"{row['accuracy_pct']:.1f}"
        if acc and row["accuracy_pct"] == best:
            acc = f"**{acc}**"
        if row["status"] != "finished":
            acc = row["status"]
        train = "" if row["train_seconds"] == "" else f"{row['train_seconds']:.0f}"
        lines.append(f"| {row['arm']} | {row['targets']} | {row['routing']} | {row['r']} | {experts} | "
                     f"{row['parameters']:,} | {row['budget_deviation_pct']:+.1f}% | {acc} | {train} | "
                     f"{row['peak_cuda_mb'] if cuda else row['peak_rss_mb']} |")
    notes = [f"- {arm.name}: {'; '.join(arm.notes)}" for arm in arms if arm.notes]
    if notes:
        lines += ["", "Notes from the budget matcher:", *notes]
    return "\n".join(lines) + "\n"
