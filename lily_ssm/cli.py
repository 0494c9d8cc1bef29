"""The ``lily-ssm`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from .data.prompts import PROTOCOLS


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(args.out, reduced=args.reduced)
    return 0


def _vtab(args: argparse.Namespace) -> int:
    from .config.vtab import load_vtab_config
    from .data.vtab import parse_tasks
    from .evaluation.vtab import summarize
    from .train.vtab import run_vtab_task

    experiment = load_vtab_config(args.config, args.set)
    tasks = parse_tasks(args.task)
    experiment.check_inputs(tasks)  # every task's inputs, before the first one trains
    results = {task: run_vtab_task(experiment, task) for task in tasks}
    print()
    print(summarize(results, experiment.training.output_dir))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config.experiment import load_config
    from .train.trainer import run_training

    config = load_config(args.config, args.set)
    if args.dry_run:
        from .analysis.memory import GIB, plan_training_memory

        plan = plan_training_memory(config)
        print(plan.table())
        print(f"fits a 24 GB GPU: {'yes' if plan.total <= 22 * GIB else 'no'} (keep about 2 GiB beyond the plan for "
              "CUDA itself); nothing was trained")
        return 0
    result = run_training(config)
    if result["main_process"] and not result.get("finished_earlier"):  # rank 0 wrote the adapter and reports it
        print(f"adapter written to {result['adapter']} after {result['global_step']} steps; log: {result['log']}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from .ablation import load_ablation, run_ablation

    overrides = list(args.set) + ([f"ablation.workers={args.workers}"] if args.workers else [])
    summary = run_ablation(load_ablation(args.config, overrides), dry_run=args.dry_run)
    return 1 if summary.get("failed") else 0


def _eval_commonsense(args: argparse.Namespace) -> int:
    from .config.record import read_record
    from .data.prompts import resolve_tasks
    from .evaluation.commonsense import evaluate_commonsense, markdown_table, task_test_file
    from .models.loading import check_model_source, load_model_and_tokenizer
    from .persistence import check_adapter_folder, load_adapter

    for task in resolve_tasks(args.tasks):  # bad task names or missing files fail before the model loads
        task_test_file(args.data_root, task)
    # a missing, damaged or unreachable adapter or a missing model folder fails before the model loads, too
    adapter = check_adapter_folder(args.adapter, args.adapter_revision) if args.adapter else None
    check_model_source(args.model)  # so does a missing model, or a Hub id offline (in seconds)
    record = read_record(adapter) if adapter else None
    trained = record.protocol if record else None
    protocol = args.protocol or trained or "paper"
    if trained and protocol != trained:
        print(f"warning: the adapter was trained with protocol {trained!r} ({record.source}), evaluating with "
              f"{protocol!r}: the prompts differ from the ones it was tuned on", file=sys.stderr)
    print(f"protocol {protocol}" + (f" (the adapter's, from {record.source})" if trained and not args.protocol
                                    else ""))
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.device_map)
    if adapter:
        load_adapter(model, adapter)
    results = evaluate_commonsense(model, tokenizer, args.data_root, args.tasks, args.batch_size, args.num_beams,
                                   args.max_new_tokens, args.limit, args.output, protocol=protocol)
    print()
    print(markdown_table({"accuracy (%)": results}))
    if args.output:
        print(f"results, table and predictions written to {args.output}/")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .analysis.inspect import inspect_adapters

    first = args.adapters[0]  # the default output sits beside a local adapter, never inside the Hub cache
    out = Path(args.out) if args.out else (Path(first) / "inspect" if Path(first).exists()
                                           else Path(f"inspect-{first.replace('/', '--')}"))
    inspect_adapters(args.adapters, out, data=args.data, model=args.model, limit=args.limit,
                     batch_size=args.batch_size, rtol=args.rtol, dtype=args.dtype, device=args.device)
    return 0  # inspect_adapters said what it wrote


def _convert(args: argparse.Namespace) -> int:
    from .interop.convert import convert_adapter

    to = "lily" if args.from_peft else "peft"
    out = convert_adapter(args.source, args.destination, to=to, model=args.model)
    print(f"{'lily-ssm' if to == 'lily' else 'PEFT'} adapter written to {out}/")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .interop.push import push_adapter

    url = push_adapter(args.adapter, args.repo_id, private=args.private or None, revision=args.revision,
                       commit_message=args.message)
    print(f"adapter {args.adapter} pushed to {args.repo_id}: {url}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from .ablation.config import reference_groups
    from .config.reference import format_reference, train_groups, vtab_groups

    groups = {"train": train_groups, "vtab": vtab_groups, "ablate": reference_groups}
    kinds = [args.kind] if args.kind else list(groups)
    print("\n\n".join(format_reference(f"lily-ssm {kind} CONFIG.yaml: every key (section.key), its default and its "
                                       "meaning", groups[kind]()) for kind in kinds))
    return 0


def _fake_vtab(args: argparse.Namespace) -> int:
    from .data.vtab import NUM_CLASSES, parse_tasks, write_fake_vtab

    tasks = parse_tasks(args.tasks)
    fewer = {t: NUM_CLASSES[t] for t in tasks if args.classes and args.classes > NUM_CLASSES[t]}
    if fewer:  # checked for every task before any is written
        has = ", ".join(f"{t} has ({n})" for t, n in fewer.items())
        raise ValueError(f"--classes {args.classes} is more than {has}; give at most {min(fewer.values())}, or leave "
                         "it unset (3, or fewer where a task has fewer)")
    for task in tasks:
        write_fake_vtab(args.root, task, classes=args.classes, per_class=args.per_class, image_size=args.image_size,
                        seed=args.seed)
    print(f"generated VTAB-1K stand-in for {len(tasks)} task(s) written to {args.root}/; try it with a tiny model: "
          f"lily-ssm vtab configs/vim/tiny.yaml --task {tasks[0]} --set data.root={args.root}")
    return 0


def _env(args: argparse.Namespace) -> int:
    from .env import main as env_main

    return env_main(args)


def _lm_eval(lm_eval_args: list[str]) -> int:
    try:
        from .evaluation.harness import run_cli
    except ImportError as exc:
        raise ValueError(f"lm-evaluation-harness is not installed ({exc}); pip install 'lily-ssm[eval]'") from exc
    return run_cli(lm_eval_args)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give a whole number >= 1")
    return value


DEBUG_HELP = "on an error, show the full traceback instead of the one-line message"
SET_METAVAR = "SECTION.KEY=VALUE"
# The 19 VTAB-1K task folders (lily_ssm.data.vtab.TASKS, which this module does not import: it loads torch).
VTAB_TASKS = ("caltech101, cifar, dtd, oxford_flowers102, oxford_iiit_pet, patch_camelyon, sun397, svhn, resisc45, "
              "eurosat, diabetic_retinopathy, dmlab, kitti, smallnorb_azi, smallnorb_ele, dsprites_loc, dsprites_ori, "
              "clevr_dist, clevr_count")
VTAB_DATA_HELP = (
    "VTAB-1K data (data.root): the layout of the NOAH, FacT and Lily code bases: <root>/<task>/ holds train800.txt, "
    "val200.txt, train800val200.txt and test.txt, each line '<image path> <label>' (the path relative to "
    "<root>/<task>/), and the images they list. vtab trains on train800val200 and reports top-1 accuracy on test. "
    f"Task folders: {VTAB_TASKS}. A generated stand-in in that layout, to try the commands without the data: "
    "lily-ssm fake-vtab vtab-1k --tasks eurosat (then --set data.root=vtab-1k).")


def _settings_epilog(kind: str, *more: str) -> str:
    """Where a command's config keys are listed, and how --set works (the text of lily-ssm config's)."""
    import textwrap

    from .config.reference import SET_HELP

    paragraphs = [f"Every config key, its default and its meaning: lily-ssm config {kind}", SET_HELP, *more]
    return "\n\n".join(textwrap.fill(p, 100) for p in paragraphs)


class _OneLineParser(argparse.ArgumentParser):
    """A usage error is one line, like every other error (the usage itself is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


class _Parser(_OneLineParser):
    """Every subcommand also accepts ``--debug`` (``lily-ssm train --debug ...``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand that is not given --debug leaves the top-level flag's value alone
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="lily-ssm", description="Lily adapters for Mamba / state-space models")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    quick = sub.add_parser("quickstart", help="the built-in default job: tiny Falcon-Mamba, generated commonsense "
                           "data, evaluate / fine-tune Lily / evaluate (CPU, no downloads, a few minutes)")
    quick.add_argument("--out", default="lily-quickstart", help="output folder (default lily-quickstart)")
    quick.add_argument("--reduced", action="store_true", help="a seconds-long smoke run (tiny sizes)")
    quick.set_defaults(func=_quickstart)

    raw = argparse.RawDescriptionHelpFormatter  # the epilogs below are wrapped already
    train = sub.add_parser("train", help="fine-tune an adapter from a YAML experiment config",
                           epilog=_settings_epilog("train"), formatter_class=raw)
    train.add_argument("config", help="YAML file with model / adapter / data / training sections (configs/)")
    train.add_argument("--set", action="append", default=[], metavar=SET_METAVAR,
                       help="override a config value, e.g. --set training.learning_rate=1e-4 (repeatable; see below)")
    train.add_argument("--dry-run", action="store_true", help="print the planned peak GPU memory of one process "
                       "(measured on the meta device at the real shapes) and stop")
    train.set_defaults(func=_train)

    vt = sub.add_parser("vtab", help="fine-tune Vision Mamba (or, with model.kind: vit, a transformers ViT) on VTAB-1K "
                        "tasks and report test accuracy", epilog=_settings_epilog("vtab", VTAB_DATA_HELP),
                        formatter_class=raw)
    vt.add_argument("config", help="YAML file with model / adapter / data / training sections (configs/vim/, "
                    "configs/vit/)")
    vt.add_argument("--task", required=True, help="a task name, a comma-separated list, or all (names below)")
    vt.add_argument("--set", action="append", default=[], metavar=SET_METAVAR,
                    help="override a config value, e.g. --set data.root=/data/vtab-1k (repeatable; see below)")
    vt.set_defaults(func=_vtab)

    ab = sub.add_parser("ablate", help="compare methods x target sets x routing modes at a matched parameter budget "
                        "(train + test every arm; resumable)", epilog=_settings_epilog("ablate"), formatter_class=raw)
    ab.add_argument("config", help="YAML file: an ablation section plus the experiment sections (configs/ablation/)")
    ab.add_argument("--workers", type=positive_int, default=None,
                    help="arms run in parallel processes (ablation.workers)")
    ab.add_argument("--dry-run", action="store_true", help="only print the arms and their sized adapters")
    ab.add_argument("--set", action="append", default=[], metavar=SET_METAVAR,
                    help="override a config value, e.g. --set ablation.budget=60000 (repeatable; see below)")
    ab.set_defaults(func=_ablate)

    ev = sub.add_parser("eval-commonsense", help="the eight-task commonsense evaluation (generation + answer match)")
    ev.add_argument("--model", required=True, help="hub id, local folder (transformers' or a mamba-ssm "
                    "checkpoint's), or builtin:tiny-falcon-mamba")
    ev.add_argument("--adapter", help="adapter folder written by lily-ssm or PEFT (LoRA / Lily), or a Hugging Face "
                    "Hub id org/name")
    ev.add_argument("--adapter-revision", default=None, help="branch, tag or commit of a Hub adapter (default main)")
    ev.add_argument("--data-root", required=True, help="the test sets: a folder with <task>/test.json for each task, "
                    "or builtin:synthetic-commonsense (generated items, for trying the command)")
    ev.add_argument("--tasks", default=None,
                    help="comma-separated subset of boolq,piqa,social_i_qa,hellaswag,winogrande,ARC-Easy,"
                         "ARC-Challenge,openbookqa (default: all eight)")
    ev.add_argument("--protocol", choices=PROTOCOLS, default=None,
                    help="paper: the published evaluator's prompt, 4 beams, answer after '### Response:'; clean: "
                         "lily-ssm's one template, greedy (default: the adapter's training protocol, else paper)")
    ev.add_argument("--batch-size", type=positive_int, default=16)
    ev.add_argument("--num-beams", type=positive_int, default=None, help="beams (default: the protocol's, 4 for paper, "
                    "1 = greedy for clean)")
    ev.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: the protocol's (32)")
    ev.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each task")
    ev.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    ev.add_argument("--device-map", default=None, help="e.g. auto or cuda:0 (default: CPU)")
    ev.add_argument("--output", default=None, help="folder for results.json, results.md and predictions/")
    ev.set_defaults(func=_eval_commonsense)

    ins = sub.add_parser("inspect", help="PNG figures of saved adapters: effective rank of ΔW per layer, router "
                         "weights, Lily's A groups and B-expert usage")
    ins.add_argument("adapters", nargs="+", help="adapter folders or Hub ids org/name (several are overlaid in the "
                     "rank figure)")
    ins.add_argument("--data", default=None, help="for Lily router weights: a commonsense JSON file, a test-set root "
                     "with <task>/test.json, builtin:synthetic-commonsense, or the VTAB-1K root for a vtab task folder")
    ins.add_argument("--model", default=None, help="base model for --data (default: the adapter's experiment.yaml)")
    ins.add_argument("--out", default=None, help="output folder (default: <first adapter>/inspect, or "
                     "inspect-<org>--<name> for a Hub adapter)")
    ins.add_argument("--limit", type=positive_int, default=64, help="data items to run (default 64)")
    ins.add_argument("--batch-size", type=positive_int, default=8)
    ins.add_argument("--rtol", type=float, default=1e-3,
                     help="effective rank = number of singular values > rtol * largest (default 1e-3)")
    ins.add_argument("--dtype", default=None, help="model dtype (default: experiment.yaml's, else auto)")
    ins.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: cuda if available)")
    ins.set_defaults(func=_inspect)

    conv = sub.add_parser("convert", help="rewrite an adapter folder between PEFT's format and lily-ssm's "
                          "(no base-model weights are loaded)")
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-peft", action="store_true", help="SOURCE is a PEFT LoRA or Lily adapter folder")
    direction.add_argument("--to-peft", action="store_true", help="SOURCE is a lily-ssm adapter folder; write one "
                           "that peft.PeftModel.from_pretrained loads on the stock transformers model")
    conv.add_argument("source", help="adapter folder to read")
    conv.add_argument("destination", help="folder to write")
    conv.add_argument("--model", default=None, help="base model, hub id or local folder (default: the one the PEFT "
                      "config or the adapter's experiment.yaml records)")
    conv.set_defaults(func=_convert)

    push = sub.add_parser("push", help="upload an adapter folder to the Hugging Face Hub with a generated model card "
                          "(base model, method, targets, parameter count, results found beside it)")
    push.add_argument("adapter", help="adapter folder written by lily-ssm")
    push.add_argument("repo_id", help="Hub repository org/name (created if needed)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", default=None, help="branch to push to (default main)")
    push.add_argument("--message", default=None, help="commit message")
    push.set_defaults(func=_push)

    cfg = sub.add_parser("config", help="every key of a train, vtab or ablate config file: its default and its "
                         "meaning (the validator's own list)")
    cfg.add_argument("kind", nargs="?", choices=("train", "vtab", "ablate"), help="which command's config "
                     "(default: all three)")
    cfg.set_defaults(func=_config)

    fake = sub.add_parser("fake-vtab", help="write generated VTAB-1K task folders (small coloured-stripe images) in "
                          "the layout lily-ssm vtab reads, to try it without the data", epilog=VTAB_DATA_HELP)
    fake.add_argument("root", help="the folder to write (the VTAB-1K root; data.root)")
    fake.add_argument("--tasks", default="all", help="all (default) or comma-separated task names, e.g. eurosat,dtd")
    fake.add_argument("--classes", type=positive_int, default=None, help="classes per task (default: 3, or the "
                      "task's own count when smaller)")
    fake.add_argument("--per-class", type=positive_int, default=4, help="images per class in each split (default 4)")
    fake.add_argument("--image-size", type=positive_int, default=32, help="image side in pixels (default 32)")
    fake.add_argument("--seed", type=int, default=0)
    fake.set_defaults(func=_fake_vtab)

    env = sub.add_parser("env", help="versions, GPU, CUDA kernels, the scan each model family takes, and installed "
                         "packages outside lily-ssm's supported ranges: paste it into a bug report")
    env.set_defaults(func=_env)

    lm = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's own command line with the 'lily' "
                        "backend registered, e.g. --model lily --model_args pretrained=...,adapter=... --tasks ... "
                        "(lm-eval versions that read plugin entry points find it without this wrapper)")
    lm.add_argument("lm_eval_args", nargs=argparse.REMAINDER)  # handed over verbatim, see main()
    return parser


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a problem with the user's input rather than a bug: the toolkit's errors
    (``ValueError`` and its subclasses ConfigError, DataError, AdapterLoadError, VimCheckpointError,
    BudgetError), the OS's about the user's files (missing, permission denied, a folder, disk full, ...),
    a missing optional dependency, and running out of memory."""
    if isinstance(exc, (ValueError, OSError, MemoryError)):
        return True
    if isinstance(exc, ModuleNotFoundError):
        return not (exc.name or "").startswith("lily_ssm")
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ()))


def error_message(exc: BaseException) -> str:
    """``exc`` as one line: an OS error as ``<file>: <reason>``; a DataLoader worker's wrapped traceback
    as its last line (the original error); any other newlines folded into spaces."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:  # "[Errno 13] Permission denied: 'x'" -> "x: Permission denied"
        text = exc.strerror if exc.filename is None else f"{exc.filename}: {exc.strerror}"
        text += f" (and {exc.filename2})" if exc.filename2 is not None else ""
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1]
    return " ".join(text.split()) or type(exc).__name__


def _run(command: str, call: Callable[[], int], debug: bool) -> int:
    """Run one command: a user error prints ``lily-ssm <command>: error: ...`` (exit 2), anything else one
    ``internal error`` line (exit 1); ``--debug`` re-raises instead, to show the traceback."""
    try:
        return call()
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(f"lily-ssm {command}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if is_user_error(exc):
            print(f"lily-ssm {command}: error: {error_message(exc)}", file=sys.stderr)
            return 2
        print(f"lily-ssm {command}: internal error: {type(exc).__name__}: {error_message(exc)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _show_progress_log() -> None:
    """Print the toolkit's INFO lines (e.g. which scan runs) to stderr, as the commands' other progress."""
    import logging

    class ToStderr(logging.StreamHandler):
        def emit(self, record: logging.LogRecord) -> None:
            self.stream = sys.stderr  # whatever stderr is now (it may have been replaced since)
            super().emit(record)

    logger = logging.getLogger("lily_ssm")
    if not logger.handlers:
        handler = ToStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _show_progress_log()
    debug = False
    while argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    if argv[:1] == ["lm-eval"]:  # everything after it (but a first --debug) belongs to lm-eval's own parser
        rest = argv[1:]
        if rest[:1] == ["--debug"]:
            debug, rest = True, rest[1:]
        return _run("lm-eval", lambda: _lm_eval(rest), debug)
    args = build_parser().parse_args(argv)
    return _run(args.command, lambda: args.func(args), debug or args.debug)


if __name__ == "__main__":
    sys.exit(main())
