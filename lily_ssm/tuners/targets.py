"""Finding the linear layers an adapter config targets, and grouping them into target types.

A *target type* is the set of modules one shared pool of adapter weights serves (e.g. every
``in_proj`` in the model). Within a type, modules are ordered by the layer index read from their
path, which decides which locally shared A expert each layer uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_PLAIN_NAME = re.compile(r"^[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class TargetModule:
    """One adapted linear layer: its path, layer index and position within its target type."""

    name: str
    layer_index: int | None
    position: int  # ℓ in DESIGN.md §2: rank of the layer among the type's adapted layers
    in_features: int
    out_features: int


@dataclass(frozen=True)
class TargetGroup:
    """All modules of one target type; they share one pool of adapter weights."""

    key: str
    modules: tuple[TargetModule, ...]
    num_layers: int  # L: number of distinct layers of this type
    in_features: int
    out_features: int


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


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the ``nn.Linear`` layers in ``model`` (for error messages)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    return sorted(names)


def find_targets(model: nn.Module, targets: str | list[str] | tuple[str, ...]) -> list[TargetGroup]:
    """Match ``targets`` against ``model`` and group the matches into target types.

    ``targets`` is a list of module-name suffixes (matched at a ``.`` boundary), or a single string:
    a plain name is a suffix, anything else a regex that must match the full module path. A target
    that matches nothing, or matches a module that is not ``nn.Linear``, raises ``ValueError``.
    """
    spec = _normalise_targets(targets)
    named = [(n, m) for n, m in model.named_modules() if n]
    matches: dict[str, tuple[str, nn.Module]] = {}  # module name -> (type key, module)

    if isinstance(spec, re.Pattern):  # a regex keeps the linear layers it matches
        for name, module in named:
            if spec.fullmatch(name) and type(module) is nn.Linear:
                matches[name] = (name.rsplit(".", 1)[-1], module)
        if not matches:
            raise ValueError(
                f"targets regex {spec.pattern!r} matches no nn.Linear of {type(model).__name__}. "
                f"Linear layers that exist: {', '.join(linear_layer_names(model))}"
            )
    else:
        for suffix in spec:
            hits = [(n, m) for n, m in named if _suffix_match(n, suffix)]
            if not hits:
                raise ValueError(
                    f"target {suffix!r} matches no module of {type(model).__name__}. "
                    f"Linear layers that exist: {', '.join(linear_layer_names(model))}"
                )
            for name, module in hits:
                if name in matches and matches[name][0] != suffix:
                    raise ValueError(f"module {name!r} is matched by two targets: {matches[name][0]!r} and {suffix!r}")
                matches[name] = (suffix, module)

    for name, (_, module) in matches.items():
        if type(module) is not nn.Linear:
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}, but adapters can only be injected into "
                f"nn.Linear layers. Linear layers that exist: {', '.join(linear_layer_names(model))}"
            )

    # Split each type by weight shape (e.g. ViT's `dense` is 768->768, 768->3072 and 3072->768).
    by_key: dict[str, list[tuple[str, nn.Linear]]] = {}
    for name, (key, module) in matches.items():
        by_key.setdefault(key, []).append((name, module))
    groups: list[TargetGroup] = []
    for key, members in by_key.items():
        shapes = sorted({(m.in_features, m.out_features) for _, m in members})
        for shape in shapes:
            subset = [(n, m) for n, m in members if (m.in_features, m.out_features) == shape]
            group_key = key if len(shapes) == 1 else f"{key}[{shape[0]}x{shape[1]}]"
            groups.append(_make_group(group_key, subset))
    return groups


def _make_group(key: str, members: list[tuple[str, nn.Linear]]) -> TargetGroup:
    indices = [layer_index_from_path(n) for n, _ in members]
    if all(i is not None for i in indices):
        distinct = sorted(set(indices))
        rank = {idx: pos for pos, idx in enumerate(distinct)}
        positions = [rank[i] for i in indices]
        num_layers = len(distinct)
    else:  # no layer numbers in the paths: traversal order is the layer order
        positions = list(range(len(members)))
        num_layers = len(members)
    modules = tuple(
        TargetModule(n, i, p, m.in_features, m.out_features)
        for (n, m), i, p in sorted(zip(members, indices, positions), key=lambda t: (t[2], t[0][0]))
    )
    first = members[0][1]
    return TargetGroup(key, modules, num_layers, first.in_features, first.out_features)


def a_group(position: int, num_layers: int, num_a: int) -> int:
    """Which locally shared A expert layer ``position`` uses: contiguous, balanced blocks."""
    return position * num_a // num_layers
