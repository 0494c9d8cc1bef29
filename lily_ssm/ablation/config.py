"""The ablation config: which methods, target sets and routing modes to compare, at what budget.

One YAML file with an ``ablation`` section plus the sections of the experiment each arm runs:
``model`` / ``data`` / ``training`` / ``evaluation`` for the language path (``lily-ssm train`` +
the commonsense evaluator), ``model`` / ``data`` / ``training`` for the VTAB path ``vim`` (``lily-ssm
vtab``, whose ``model.kind`` is Vision Mamba or, with ``kind: vit``, a transformers ViT). Each arm's
adapter is not written by hand: the budget matcher sizes it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import experiment, vtab
from ..config.reference import Group, experiment_groups
from ..modules.registry import MAMBA2_MIXERS, SHORT_CONV_LAYERS
from ..tuners.lily.config import ROUTING_MODES, lookahead_problem
from ..utils.sections import Bound, ConfigError, parse_sections, read_yaml, setting

PATHS = ("language", "vim")
METHODS = ("lily", "lora")

def _gated_delta_sets(q: str, k: str, v: str, z: str, b: str, a: str, out: str, qkvz: list[str] | None = None,
                      ba: list[str] | None = None) -> dict[str, list[str]]:
    """A gated-delta-rule layer's presets from the targets of its q, k, v, z, β (b), decay gate (a) and output
    projection (or parts); ``qkvz`` / ``ba`` are the packed modules where the family has them."""
    return {"qkvz": qkvz or [q, k, v, z], "q.k.v": [q, k, v], "q": [q], "k": [k], "v": [v], "z": [z],
            "ba": ba or [b, a], "b": [b], "a": [a], "out_proj": [out],
            "all": [*(qkvz or [q, k, v, z]), *(ba or [b, a]), out]}


# Named target sets. "Δ" is dt_proj; Vim's bidirectional mixer has a second x_proj / dt_proj per layer
# (x_proj_b / dt_proj_b) and its sets cover both directions.
TARGET_SETS: dict[str, dict[str, list[str]]] = {
    "language": {
        "in": ["in_proj"], "dt": ["dt_proj"], "dt+in": ["in_proj", "dt_proj"], "x_proj": ["x_proj"],
        "out_proj": ["out_proj"], "in.x": ["in_proj.x"], "in.z": ["in_proj.z"], "x_proj.dt": ["x_proj.dt"],
        "x_proj.B": ["x_proj.B"], "x_proj.C": ["x_proj.C"], "all": ["in_proj", "x_proj", "dt_proj", "out_proj"],
    },
    # transformers' Mamba-2 family (Mamba2, Bamba, Falcon-H1, Nemotron-H, Zamba2, Granite 4.0): no x_proj or
    # dt_proj; in_proj packs z, x, B, C and Δ (dt), each a part of its own.
    "language-mamba2": {
        "in": ["in_proj"], "out_proj": ["out_proj"], "in.z": ["in_proj.z"], "in.x": ["in_proj.x"],
        "in.B": ["in_proj.B"], "in.C": ["in_proj.C"], "in.dt": ["in_proj.dt"], "in.x+dt": ["in_proj.x", "in_proj.dt"],
        "all": ["in_proj", "out_proj"],
    },
    # The hybrids' recurrent layers (docs: the family table). Gated delta rule: q / k / v, the output gate z, β
    # (b) and the decay gate (a, the Δ analogue); their names are qualified where the attention layers share them.
    "language-qwen3-next": _gated_delta_sets("in_proj_qkvz.q", "in_proj_qkvz.k", "in_proj_qkvz.v", "in_proj_qkvz.z",
                                             "in_proj_ba.b", "in_proj_ba.a", "linear_attn.out_proj",
                                             qkvz=["in_proj_qkvz"], ba=["in_proj_ba"]),
    "language-qwen3.5": _gated_delta_sets("in_proj_qkv.q", "in_proj_qkv.k", "in_proj_qkv.v", "in_proj_z", "in_proj_b",
                                          "in_proj_a", "linear_attn.out_proj", qkvz=["in_proj_qkv", "in_proj_z"]),
    "language-olmo-hybrid": _gated_delta_sets(*(f"linear_attn.{n}_proj" for n in ("q", "k", "v", "g", "b", "a", "o"))),
    # Kimi Linear's q_proj / o_proj share their names with its MLA attention layers', so no name-based preset
    # can single them out; these presets adapt only projections no attention layer has.
    "language-kimi-linear": {
        "k.v": ["self_attn.k_proj", "self_attn.v_proj"], "z": ["self_attn.g_a_proj", "self_attn.g_b_proj"],
        "b": ["self_attn.b_proj"], "a": ["forget_gate.f_a_proj", "forget_gate.f_b_proj"],
        "k.v+z+b+a": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.g_a_proj", "self_attn.g_b_proj",
                      "self_attn.b_proj", "forget_gate.f_a_proj", "forget_gate.f_b_proj"],
    },
    # LFM2's gated short convolution: in_proj packs B, C and x in thirds.
    "language-lfm2": {
        "in": ["conv.in_proj"], "in.B": ["conv.in_proj.B"], "in.C": ["conv.in_proj.C"], "in.x": ["conv.in_proj.x"],
        "out_proj": ["conv.out_proj"], "all": ["conv.in_proj", "conv.out_proj"],
    },
    "vim": {
        "in": ["in_proj"], "dt": ["dt_proj", "dt_proj_b"], "dt+in": ["in_proj", "dt_proj", "dt_proj_b"],
        "x_proj": ["x_proj", "x_proj_b"], "out_proj": ["out_proj"], "in.x": ["in_proj.x"], "in.z": ["in_proj.z"],
        "x_proj.dt": ["x_proj.dt", "x_proj_b.dt"], "x_proj.B": ["x_proj.B", "x_proj_b.B"],
        "x_proj.C": ["x_proj.C", "x_proj_b.C"],
        "all": ["in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"],
    },
    # transformers' ViT (model.kind: vit on the VTAB path): the placements of the paper's App. E, where "mlp"
    # is the adapter parallel to the whole MLP block (the published vit/lily.py).
    "vit": {
        "qv": ["q_proj", "v_proj"], "kv": ["k_proj", "v_proj"], "qkv": ["q_proj", "k_proj", "v_proj"],
        "mlp": ["mlp"], "qv+mlp": ["q_proj", "v_proj", "mlp"], "kv+mlp": ["k_proj", "v_proj", "mlp"],
        "fc": ["fc1", "fc2"],
    },
}
DEFAULT_SETS = {"language": ["in", "dt", "dt+in", "x_proj", "out_proj", "in.x", "in.z", "all"],
                "language-mamba2": ["in", "out_proj", "in.z", "in.x", "in.B", "in.C", "in.dt", "all"],
                **{t: ["qkvz", "q.k.v", "z", "ba", "b", "a", "out_proj", "all"]
                   for t in ("language-qwen3-next", "language-qwen3.5", "language-olmo-hybrid")},
                "language-kimi-linear": ["k.v", "z", "b", "a", "k.v+z+b+a"],
                "language-lfm2": ["in", "in.B", "in.C", "in.x", "out_proj", "all"],
                "vim": ["in", "dt", "dt+in", "x_proj", "out_proj", "in.x", "in.z", "all"],
                "vit": ["qv", "mlp", "qv+mlp", "kv+mlp"]}
# By preset table: Mamba LMs route causally; Vim per token (the paper's Vim runs); ViT per batch (the
# published vit/lily.py averages the router softmax over the batch and its tokens).
DEFAULT_ROUTING = {**{t: "causal" for t in TARGET_SETS if t.startswith("language")}, "vim": "token", "vit": "batch"}
# The preset table of a language model with one of these layers (else Mamba-1's).
LAYER_TABLES = {**{name: "language-mamba2" for name in MAMBA2_MIXERS},
                "Qwen3NextGatedDeltaNet": "language-qwen3-next", "Qwen3_5GatedDeltaNet": "language-qwen3.5",
                "Qwen3_5MoeGatedDeltaNet": "language-qwen3.5", "OlmoHybridGatedDeltaNet": "language-olmo-hybrid",
                "KimiLinearDeltaAttention": "language-kimi-linear",
                **{name: "language-lfm2" for name in SHORT_CONV_LAYERS}}
DEFAULT_METHOD_SETTINGS = {"lily": {"num_A": 4, "num_B": 4}, "lora": {}}  # LoRA: alpha = 2·r unless set
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # names become folder names


@dataclass
class AblationSection:
    output_dir: str = setting(help="one sub-folder per arm, plus plan.json, results.csv / .json and summary.md")
    budget: int = setting(help="adapter parameters per arm (a classifier head is counted apart)")
    path: str = setting("language", help="language (lily-ssm train + the commonsense evaluator) or vim (lily-ssm "
                                         "vtab, Vim or ViT)")
    methods: list[str] = setting(default_factory=lambda: list(METHODS), help="methods to compare: lily, lora")
    target_sets: Any = setting(None, help="preset names, or a mapping name: [targets]; unset: the family's "
                                          "default presets")
    routing: list[str] | None = setting(None, help="Lily routing modes, one Lily arm each; unset: causal for "
                                                   "language models, token for Vim, batch for ViT")
    tolerance: float = setting(0.05, help="how far an arm's parameter count may be from the budget (a fraction)")
    lily: dict[str, Any] = setting(default_factory=dict, help="Lily settings of every Lily arm (adapter keys but "
                                                              "method, targets, r, overrides; r is sized per arm); "
                                                              "default num_A 4, num_B 4")
    lora: dict[str, Any] = setting(default_factory=dict, help="LoRA settings of every LoRA arm: dropout, "
                                                              "modules_to_save, and alpha or alpha_per_rank (alpha = "
                                                              "alpha_per_rank·r, default 2); r is sized per arm")
    workers: int = setting(1, help="arms run in parallel processes")
    tasks: list[str] | None = setting(None, help="vim path: the VTAB tasks each arm trains and tests on")


@dataclass
class EvaluationSection:
    """How each language arm is scored; the prompt protocol is the arms' ``data.protocol``."""

    data_root: str = setting(help="test sets: <task>/test.json per task, or builtin:synthetic-commonsense")
    tasks: Any = setting(None, help="comma-separated task names or a list; unset: all eight")
    batch_size: int = setting(16, help="prompts per generation batch", bound=Bound(1))
    num_beams: int | None = setting(None, help="beams; unset: the protocol's (4 for paper, greedy for clean)")
    max_new_tokens: int | None = setting(None, help="new tokens per answer; unset: the protocol's (32)")
    limit: int | None = setting(None, help="only the first N items of each task")


@dataclass
class AblationConfig:
    """The parsed file: the ablation section and, per path, the raw experiment sections arms share."""

    ablation: AblationSection
    sections: dict[str, Any]  # model / data / training (/ evaluation) mappings, validated
    source: str = "<dict>"

    def presets(self, model: nn.Module | None = None) -> str:
        """The preset table of the arms' architecture: on the VTAB path its ``model.kind`` (``vim`` or
        ``vit``); on the language path ``language`` (Mamba-1), or the table of the recurrent layers ``model``
        has (:data:`LAYER_TABLES`: Mamba-2 mixers, the hybrids' gated-delta-rule and short-convolution layers)."""
        if self.ablation.path != "language":
            return str(self.sections["model"].get("kind", "vim"))
        kinds = {type(m).__name__ for m in model.modules()} if model is not None else set()
        return next((LAYER_TABLES[k] for k in LAYER_TABLES if k in kinds), self.ablation.path)

    def target_sets(self, model: nn.Module | None = None) -> dict[str, list[str]]:
        """The target sets by name. Without ``model``, preset names are checked against every table of the
        path (the architecture is known once the model is built)."""
        table = self.presets(model)
        sets = self.ablation.target_sets if self.ablation.target_sets is not None else DEFAULT_SETS[table]
        if isinstance(sets, dict):
            bad = [str(name) for name in sets if not _SET_NAME.match(str(name))]
            if bad:
                raise ConfigError(f"{self.source}: ablation.target_sets name(s) {', '.join(map(repr, bad))}: a name "
                                  "becomes a folder name; use letters, digits and _ . + -")
            return {str(name): _target_list(name, targets, self.source) for name, targets in sets.items()}
        if not isinstance(sets, list) or not sets:
            raise ConfigError(f"{self.source}: ablation.target_sets={sets!r}; give preset names or a mapping "
                              "name: [targets]")
        tables = [table] if model is not None or self.ablation.path != "language" else \
            [t for t in TARGET_SETS if t.startswith(self.ablation.path)]
        known = {name for t in tables for name in TARGET_SETS[t]}
        unknown = [name for name in sets if name not in known]
        if unknown:
            raise ConfigError(f"{self.source}: ablation.target_sets has unknown preset(s) "
                              f"{', '.join(map(str, unknown))}; presets for "
                              + "; ".join(f"{t}: {', '.join(TARGET_SETS[t])}" for t in tables)
                              + " (or give a mapping name: [targets])")
        return {name: list(TARGET_SETS[table].get(name, [])) for name in sets}

    def routing_modes(self) -> list[str]:
        return list(self.ablation.routing or [DEFAULT_ROUTING[self.presets()]])


def _target_list(name: Any, targets: Any, source: str) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"{source}: ablation.target_sets.{name} must be a list of target names, got {targets!r}")
    return targets


def section_classes(path: str) -> dict[str, type]:
    """The experiment sections an ablation file of ``path`` holds besides ``ablation``."""
    if path == "language":
        return {**experiment.SECTIONS, "evaluation": EvaluationSection}
    return dict(vtab.SECTIONS)


# Training keys the runner sets per arm, which an ablation file may not: why, for the error.
PER_ARM = {"training.output_dir": "each arm's folder is set under ablation.output_dir",
           "training.resume": "each arm continues its own run, and a finished arm is skipped (delete "
                              "<ablation.output_dir>/<arm>/ to run it again)"}


def reference_groups() -> list[Group]:
    """``lily-ssm ablate``'s keys: the ablation section, then each path's experiment sections (no adapter
    section, and no training.output_dir or training.resume: the budget matcher and the runner set those per arm)."""
    groups = experiment_groups({"ablation": AblationSection})
    for path in PATHS:
        groups += [(f"{heading} (ablation.path: {path})", rows) for heading, rows in
                   experiment_groups(section_classes(path), skip=set(PER_ARM))]
    return groups


def parse_ablation(raw: Any, source: str = "<dict>") -> AblationConfig:
    """Validate a raw ablation mapping; errors name the file, section and key."""
    if not isinstance(raw, dict) or not isinstance(raw.get("ablation"), dict):
        raise ConfigError(f"{source}: expected an 'ablation' section (output_dir, budget, methods, target_sets, ...)")
    raw = dict(raw)
    ablation_raw = raw.pop("ablation")
    if "adapter" in raw:
        raise ConfigError(f"{source}: an ablation has no 'adapter' section: each arm's adapter is sized by the budget "
                          "matcher; put Lily / LoRA settings in ablation.lily / ablation.lora")
    parsed, _ = parse_sections({"ablation": ablation_raw, "adapter": {}}, {"ablation": AblationSection}, source)
    ablation: AblationSection = parsed["ablation"]
    _check_ablation(ablation, source)
    ablation.lily = {**DEFAULT_METHOD_SETTINGS["lily"], **ablation.lily}
    ablation.lora = {**DEFAULT_METHOD_SETTINGS["lora"], **ablation.lora}
    if "lily" in ablation.methods and ablation.lily["num_B"] == 1 and len(ablation.routing or []) > 1:
        raise ConfigError(f"{source}: ablation.routing={ablation.routing!r} with ablation.lily.num_B=1: without "
                          "several B experts there is no router, so every routing mode is the same run")

    classes = section_classes(ablation.path)
    training = dict(raw.get("training") or {})
    for key, why in PER_ARM.items():
        if key.split(".", 1)[1] in training:
            raise ConfigError(f"{source}: {key} is not an ablation setting: {why}; remove it")
    raw["training"] = {**training, "output_dir": "<per arm>"}
    sections, _ = parse_sections({**raw, "adapter": {}}, classes, source)
    if ablation.path == "vim":
        try:
            sections["model"].check()
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    values = {name: section.record() if hasattr(section, "record") else asdict(section)
              for name, section in sections.items()}
    del values["training"]["output_dir"]
    # resume is the runner's per arm; the specs record what they held before resume: auto existed (the language
    # section's old default false, no key on the Vim path), so that earlier ablation folders still match
    del values["training"]["resume"]
    if ablation.path == "language":
        values["training"]["resume"] = False
    config = AblationConfig(ablation, values, source)
    config.target_sets()
    if ablation.path == "language" and "lily" in ablation.methods:  # refuse a leaking arm before any trains
        for mode in config.routing_modes():
            problem = lookahead_problem(mode, ablation.lily.get("allow_lookahead", False),
                                        sections["data"].train_on_inputs)
            if problem:
                raise ConfigError(f"{source}: ablation.routing has {mode!r} with data.train_on_inputs="
                                  f"{sections['data'].train_on_inputs}: {problem}")
    return config


def _check_ablation(ablation: AblationSection, source: str) -> None:
    def bad(key: str, value: Any, valid: str) -> ConfigError:
        return ConfigError(f"{source}: ablation.{key}={value!r}; {valid}")

    if ablation.path not in PATHS:
        raise bad("path", ablation.path, f"paths: {', '.join(PATHS)}")
    if not isinstance(ablation.budget, int) or isinstance(ablation.budget, bool) or ablation.budget < 1:
        raise bad("budget", ablation.budget, "must be a positive number of adapter parameters")
    methods = ablation.methods
    if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods):
        raise bad("methods", ablation.methods, f"a non-empty list of {', '.join(METHODS)}")
    if ablation.routing is not None and (not isinstance(ablation.routing, list) or not ablation.routing
                                  or any(r not in ROUTING_MODES for r in ablation.routing)):
        raise bad("routing", ablation.routing, f"a non-empty list of {', '.join(ROUTING_MODES)}")
    if not 0 < ablation.tolerance < 1:
        raise bad("tolerance", ablation.tolerance, "a fraction between 0 and 1, e.g. 0.05")
    if not isinstance(ablation.workers, int) or ablation.workers < 1:
        raise bad("workers", ablation.workers, "a positive number of parallel processes")
    for key in ("lily", "lora"):
        if not isinstance(getattr(ablation, key), dict):
            raise bad(key, getattr(ablation, key), "a mapping of adapter settings")
        fixed = sorted({"r", "targets", "method", "overrides"} & set(getattr(ablation, key)))
        if fixed:
            raise bad(key, getattr(ablation, key), f"{', '.join(fixed)} are set per arm, not here")
    if ablation.path == "vim":
        from ..data.vtab import TASKS

        if not ablation.tasks or not isinstance(ablation.tasks, list) or any(t not in TASKS for t in ablation.tasks):
            raise bad("tasks", ablation.tasks, f"the Vim path needs a list of VTAB tasks from: {', '.join(TASKS)}")
    elif ablation.tasks is not None:
        raise bad("tasks", ablation.tasks, "only the Vim path takes tasks (the language path uses evaluation.tasks)")


def load_ablation(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    """Read an ablation YAML file with ``--set section.key=value`` overrides."""
    sections = ("ablation", "model", "data", "training", "evaluation")
    return parse_ablation(read_yaml(path, overrides, sections), str(path))
