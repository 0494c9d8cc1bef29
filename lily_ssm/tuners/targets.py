"""Finding the linear layers an adapter config targets, and grouping them into target types.

A *target type* is the set of modules one shared pool of adapter weights serves (e.g. every
``in_proj`` in the model). Within a type, modules are ordered by the layer index read from their
path, which decides which locally shared A expert each layer uses.

A target may also name a *part* of a packed projection's output: ``in_proj.x`` / ``in_proj.z`` (the
SSM input and the gate halves) and ``x_proj.dt`` / ``x_proj.B`` / ``x_proj.C`` (the Δ, B and C
slices) on Mamba; on the hybrids, e.g. ``in_proj_qkvz.q`` or ``in_proj_ba.a`` (Qwen3-Next's decay gate, the Δ
analogue). The adapter then adds to those output features only.

Or it may name a whole *block* an adapter runs parallel to (ViT's ``mlp``; see :mod:`.blocks`): the
adapter reads the block's input and adds to its output, with the block kind's nonlinearity between A
and B (the group's ``activation``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..modules.registry import GATED_DELTA_LAYERS, MAMBA1_MIXERS, MAMBA2_MIXERS, SHORT_CONV_LAYERS
from .blocks import BLOCKS_HELP, block_kind, block_widths

_PLAIN_NAME = re.compile(r"^[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class TargetModule:
    """One adapted linear layer (or part of its output): path, layer index, position within its type."""

    name: str
    layer_index: int | None
    position: int  # ℓ in docs/design.md §2: rank of the layer among the type's adapted layers
    in_features: int
    out_features: int  # of the adapted part
    part: str | None = None  # e.g. "x" for in_proj.x; None for the whole output
    out_slice: tuple[int, int] | None = None  # [start, stop) of the module's output (of each group) the part covers
    out_groups: int = 1  # the output is this many equal blocks, and the part is out_slice of each

    @property
    def key(self) -> str:
        """Unique name of this adapted slot: the module path, plus ``.<part>`` for a part target."""
        return self.name if self.part is None else f"{self.name}.{self.part}"


@dataclass(frozen=True)
class TargetGroup:
    """All modules of one target type; they share one pool of adapter weights."""

    key: str
    modules: tuple[TargetModule, ...]
    num_layers: int  # L: number of distinct layers of this type
    in_features: int
    out_features: int
    activation: str | None = None  # between A and B: a block target's (blocks.ACTIVATIONS), else none


def layer_index_from_path(name: str) -> int | None:
    """The first integer component of a module path (``backbone.layers.5.mixer.in_proj`` -> 5)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _normalise_targets(targets: str | list[str] | tuple[str, ...]) -> list[str] | re.Pattern:
    if isinstance(targets, str):
        if _PLAIN_NAME.match(targets):
            return [targets]
        try:
            return re.compile(targets)
        except re.error as exc:
            raise ValueError(f"targets={targets!r} is neither a module name nor a valid regex: {exc}") from exc
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty list of module-name suffixes or a regex, got {targets!r}")
    return targets


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


# Output parts of Mamba projections that can be adapted on their own, in output order.
PARTS = {"in_proj": ("x", "z"), "x_proj": ("dt", "B", "C")}
MAMBA2_PARTS = ("z", "x", "B", "C", "dt")
_PARTS_HELP = ("in_proj.x / in_proj.z (SSM input / gate halves) and x_proj.dt / x_proj.B / x_proj.C on Mamba-1; "
               "in_proj.z / .x / .B / .C / .dt on Mamba-2; in_proj_qkvz.q / .k / .v / .z and in_proj_ba.b / .a on "
               "Qwen3-Next; in_proj_qkv.q / .k / .v on Qwen3.5; in_proj.B / .C / .x on LFM2")


@dataclass(frozen=True)
class OutputPart:
    """Output features ``[start, stop)`` of each of ``groups`` equal blocks of a projection's output: one
    contiguous slice when ``groups`` is 1; Qwen3-Next's per-key-head-group interleaving otherwise."""

    start: int
    stop: int
    groups: int = 1

    @property
    def width(self) -> int:
        return self.groups * (self.stop - self.start)


def _packed(names: tuple[str, ...], widths: list[int], groups: int = 1) -> dict[str, OutputPart]:
    bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
    return {n: OutputPart(a, b, groups) for n, a, b in zip(names, bounds[:-1], bounds[1:])}


def mamba2_in_proj_parts(mixer: nn.Module, out_features: int) -> dict[str, OutputPart]:
    """The output slices of a Mamba-2 ``in_proj``: ``z`` (gate), ``x``, ``B``, ``C`` and ``dt``, after any
    leading MLP halves that some checkpoints put first."""
    d, gn, h = mixer.intermediate_size, mixer.n_groups * mixer.ssm_state_size, mixer.num_heads
    start = out_features - (2 * d + 2 * gn + h)
    if start < 0 or start % 2:
        raise ValueError(f"in_proj of {type(mixer).__name__} has {out_features} outputs; expected 2·{d} + 2·{gn} + "
                         f"{h} (z, x, B, C, dt), after an even number of MLP outputs")
    bounds = [start, start + d, start + 2 * d, start + 2 * d + gn, start + 2 * d + 2 * gn, out_features]
    return {n: OutputPart(a, b) for n, a, b in zip(MAMBA2_PARTS, bounds[:-1], bounds[1:])}


def recurrent_layer_parts(layer: nn.Module, leaf: str, out_features: int) -> dict[str, OutputPart] | None:
    """The output parts of a packed projection ``leaf`` of a gated-delta-rule or short-convolution layer, or
    None if it has none.

    Qwen3-Next packs per key-head group: ``in_proj_qkvz`` is, for each of the ``num_k_heads`` groups,
    ``[q, k, v, z]`` (``head_k_dim, head_k_dim, r·head_v_dim, r·head_v_dim`` with ``r = num_v_heads /
    num_k_heads``) and ``in_proj_ba`` is ``[b, a]`` (``r, r``) per group, as its
    ``fix_query_key_value_ordering`` unpacks them. Qwen3.5's ``in_proj_qkv`` is ``[q, k, v]`` whole; LFM2's
    ``in_proj`` is ``[B, C, x]`` in thirds.
    """
    kind = type(layer).__name__
    if kind == "Qwen3NextGatedDeltaNet" and leaf in ("in_proj_qkvz", "in_proj_ba"):
        groups, r = layer.num_k_heads, layer.num_v_heads // layer.num_k_heads
        parts = (_packed(("q", "k", "v", "z"), [layer.head_k_dim] * 2 + [r * layer.head_v_dim] * 2, groups)
                 if leaf == "in_proj_qkvz" else _packed(("b", "a"), [r, r], groups))
    elif kind in ("Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet") and leaf == "in_proj_qkv":
        parts = _packed(("q", "k", "v"), [layer.key_dim, layer.key_dim, layer.value_dim])
    elif kind in SHORT_CONV_LAYERS and leaf == "in_proj":
        third = out_features // 3
        parts = _packed(("B", "C", "x"), [third] * 3)
    else:
        return None
    width = sum(p.width for p in parts.values())
    if width != out_features:
        raise ValueError(f"{leaf} of {kind} has {out_features} outputs; its packed parts "
                         f"({', '.join(parts)}) need {width}")
    return parts


def output_parts(model: nn.Module, name: str, module: nn.Linear) -> dict[str, OutputPart] | None:
    """The named output parts of a packed projection (None if ``name`` is not one).

    A Mamba-1 ``in_proj`` is split in halves (x, z). ``x_proj`` (and Vim's ``x_proj_b``) is split as
    ``[dt_rank, d_state, d_state]``; dt_rank is read from the sibling ``dt_proj`` (``dt_proj_b``), whose
    input is the Δ slice. A Mamba-2 ``in_proj`` is ``[z, x, B, C, dt]`` (:func:`mamba2_in_proj_parts`). The
    hybrids' packed projections are in :func:`recurrent_layer_parts`.
    """
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    kind = type(parent).__name__
    if kind in GATED_DELTA_LAYERS + SHORT_CONV_LAYERS:
        return recurrent_layer_parts(parent, leaf, module.out_features)
    if leaf != "in_proj" and not leaf.startswith("x_proj"):
        return None
    if kind in MAMBA2_MIXERS and leaf == "in_proj":
        return mamba2_in_proj_parts(parent, module.out_features)
    if kind not in MAMBA1_MIXERS:
        raise ValueError(f"parts of {name} are not defined: its parent is a {kind}, and parts are defined for the "
                         f"Mamba mixers {', '.join(MAMBA1_MIXERS + MAMBA2_MIXERS)} and the hybrids' recurrent "
                         f"layers {', '.join(GATED_DELTA_LAYERS + SHORT_CONV_LAYERS)}")
    out = module.out_features
    if leaf == "in_proj":
        if out % 2:
            raise ValueError(f"{name} has {out} outputs; a Mamba in_proj has an even number (x and z halves)")
        return _packed(("x", "z"), [out // 2, out // 2])
    sibling = name[: len(name) - len(leaf)] + "dt_proj" + leaf[len("x_proj"):]
    try:
        dt_proj = model.get_submodule(sibling)
    except AttributeError:
        return None
    rank = dt_proj.in_features
    if rank >= out or (out - rank) % 2:
        raise ValueError(f"{name} has {out} outputs and {sibling} takes {rank}; expected dt_rank + 2·d_state")
    state = (out - rank) // 2
    return _packed(("dt", "B", "C"), [rank, state, state])


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the ``nn.Linear`` layers in ``model`` (for error messages)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    return sorted(names)


def _targetable(model: nn.Module) -> str:
    """What ``model`` offers to target, for error messages: its linear layers and any blocks."""
    blocks = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and block_kind(m) is not None})
    text = f"Linear layers that exist: {', '.join(linear_layer_names(model))}"
    return text + (f"; blocks an adapter can run parallel to: {', '.join(blocks)}" if blocks else "")


def find_targets(model: nn.Module, targets: str | list[str] | tuple[str, ...]) -> list[TargetGroup]:
    """Match ``targets`` against ``model`` and group the matches into target types.

    ``targets`` is a list of module-name suffixes (matched at a ``.`` boundary), or a single string:
    a plain name is a suffix, anything else a regex that must match the full module path. A suffix
    target may name a part of a Mamba projection (``in_proj.x``, ``x_proj.dt``; see :data:`PARTS`). A
    target may also name a block an adapter runs parallel to (a module whose class is in
    :data:`.blocks.BLOCKS`, e.g. ViT's ``mlp``). A target that matches nothing, or matches a module that
    is neither ``nn.Linear`` nor such a block, raises ``ValueError``.
    """
    spec = _normalise_targets(targets)
    named = [(n, m) for n, m in model.named_modules() if n]
    matches: dict[tuple[str, str | None], tuple[str, nn.Module]] = {}  # (module, part) -> (type key, module)

    if isinstance(spec, re.Pattern):  # a regex keeps the linear layers it matches
        for name, module in named:
            if spec.fullmatch(name) and type(module) is nn.Linear:
                matches[(name, None)] = (name.rsplit(".", 1)[-1], module)
        if not matches:
            raise ValueError(
                f"targets regex {spec.pattern!r} matches no nn.Linear of {type(model).__name__}. "
                f"Linear layers that exist: {', '.join(linear_layer_names(model))} (a regex targets linear layers "
                "only; name a block such as mlp in a list)"
            )
    else:
        for target in spec:
            for name, part, module in _match_suffix(model, named, target):
                if (name, part) in matches and matches[(name, part)][0] != target:
                    raise ValueError(f"module {name!r} is matched by two targets: "
                                     f"{matches[(name, part)][0]!r} and {target!r}")
                matches[(name, part)] = (target, module)
        for name, part in matches:
            if part is not None and (name, None) in matches:
                raise ValueError(f"module {name!r} is targeted whole by {matches[(name, None)][0]!r} and in part "
                                 f"by {matches[(name, part)][0]!r}; target either the module or its parts")

    for (name, _), (_, module) in matches.items():
        if type(module) is not nn.Linear and block_kind(module) is None:
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}, but adapters go into nn.Linear layers or "
                f"run parallel to a whole {BLOCKS_HELP}. {_targetable(model)}"
            )

    slots: list[_Slot] = []
    for (name, part), (key, module) in matches.items():
        kind = block_kind(module) if type(module) is not nn.Linear else None
        if kind is not None:
            slots.append(_Slot(key, name, None, None, *block_widths(module, kind), kind.activation))
            continue
        found = output_parts(model, name, module)[part] if part is not None else None
        out = module.out_features if found is None else found.width
        out_slice = None if found is None else (found.start, found.stop)
        slots.append(_Slot(key, name, part, out_slice, module.in_features, out, out_groups=found.groups if found
                           else 1))

    # Split each type by shape (e.g. ViT's `dense` is 768->768, 768->3072 and 3072->768).
    by_key: dict[str, list[_Slot]] = {}
    for slot in slots:
        by_key.setdefault(slot.key, []).append(slot)
    groups: list[TargetGroup] = []
    for key, members in by_key.items():
        if len({m.activation is None for m in members}) > 1:
            raise ValueError(f"target {key!r} matches both nn.Linear layers and blocks; name one kind per target")
        shapes = sorted({(m.in_features, m.out_features) for m in members})
        for shape in shapes:
            subset = [m for m in members if (m.in_features, m.out_features) == shape]
            group_key = key if len(shapes) == 1 else f"{key}[{shape[0]}x{shape[1]}]"
            groups.append(_make_group(group_key, subset))
    return groups


@dataclass(frozen=True)
class _Slot:
    key: str  # the target that matched
    name: str
    part: str | None
    out_slice: tuple[int, int] | None
    in_features: int
    out_features: int
    activation: str | None = None
    out_groups: int = 1


def _match_suffix(model: nn.Module, named: list[tuple[str, nn.Module]],
                  target: str) -> list[tuple[str, str | None, nn.Module]]:
    """Modules (and parts) a suffix target names: ``in_proj`` or, for a part, ``in_proj.x``."""
    hits = [(n, None, m) for n, m in named if _suffix_match(n, target)]
    if hits:
        return hits
    base, _, part = target.rpartition(".")
    base_hits = [(n, m) for n, m in named if base and _suffix_match(n, base)]
    if not base_hits:
        raise ValueError(
            f"target {target!r} matches no module of {type(model).__name__}. {_targetable(model)}; parts that "
            f"can be targeted: {_PARTS_HELP}; blocks: {BLOCKS_HELP}"
        )
    found = []
    for name, module in base_hits:
        parts = output_parts(model, name, module) if isinstance(module, nn.Linear) else None
        if parts is None or part not in parts:
            valid = f"its parts are {', '.join(parts)}" if parts else f"only {_PARTS_HELP} have parts"
            raise ValueError(f"target {target!r}: {name!r} has no output part {part!r}; {valid}")
        found.append((name, part, module))
    return found


def _make_group(key: str, members: list[_Slot]) -> TargetGroup:
    indices = [layer_index_from_path(m.name) for m in members]
    if all(i is not None for i in indices):
        distinct = sorted(set(indices))
        rank = {idx: pos for pos, idx in enumerate(distinct)}
        positions = [rank[i] for i in indices]
        num_layers = len(distinct)
    else:  # no layer numbers in the paths: traversal order is the layer order
        positions = list(range(len(members)))
        num_layers = len(members)
    modules = tuple(
        TargetModule(m.name, i, p, m.in_features, m.out_features, m.part, m.out_slice, m.out_groups)
        for m, i, p in sorted(zip(members, indices, positions), key=lambda t: (t[2], t[0].name))
    )
    return TargetGroup(key, modules, num_layers, members[0].in_features, members[0].out_features,
                       members[0].activation)


def a_group(position: int, num_layers: int, num_A: int, stride_A: int | None = None) -> int:
    """Which locally shared A expert layer ``position`` uses: contiguous, balanced blocks, or with
    ``stride`` blocks of ``stride`` layers (PEFT's ``stride_A`` and the published code)."""
    if stride_A is not None:
        return position // stride_A
    return position * num_A // num_layers
