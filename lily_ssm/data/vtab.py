"""VTAB-1K (docs/design.md §5): the 19 tasks, an image-folder data set that reads the usual list files, and scoring
helpers.

Layout on disk (the one the NOAH / FacT / Lily code bases use)::

    <root>/<task>/train800.txt
    <root>/<task>/val200.txt
    <root>/<task>/train800val200.txt
    <root>/<task>/test.txt
    <root>/<task>/<relative image path>...

Each list line is ``<relative image path> <label>``; the path is relative to ``<root>/<task>/`` (it may
contain spaces: the label is the last whitespace-separated field). The protocol trains on
``train800val200`` and reports top-1 accuracy on ``test``, with images resized to 224 x 224.

:class:`VTabDataset` checks everything it can cheaply check when it is built (task name, list file,
every line, every label against the task's class count, every image file's existence, and that every
image path stays inside the task folder) so that a bad data folder fails before training starts; an
image that exists but cannot be decoded fails when it is loaded, with its path and list line in the
message.

:func:`group_means` turns per-task accuracies into the Natural / Specialized / Structured means plus the
two overall averages papers use (see its docstring). :func:`write_fake_vtab` writes a small generated
folder in the same layout, for tests and offline demos.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..utils.atomic import write_atomic

NUM_CLASSES: dict[str, int] = {
    "caltech101": 102,
    "cifar": 100,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "patch_camelyon": 2,
    "sun397": 397,
    "svhn": 10,
    "resisc45": 45,
    "eurosat": 10,
    "diabetic_retinopathy": 5,
    "dmlab": 6,
    "kitti": 4,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "clevr_dist": 6,
    "clevr_count": 8,
}
"""Class count of each of the 19 VTAB-1K tasks (the folder names used on disk)."""

GROUPS: dict[str, tuple[str, ...]] = {
    "Natural": ("caltech101", "cifar", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "Specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "Structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"),
}
"""The three VTAB task groups (7 natural, 4 specialized, 8 structured)."""

TASKS: tuple[str, ...] = tuple(NUM_CLASSES)
"""All 19 task names, in the order of :data:`NUM_CLASSES`."""

GROUP_OF: dict[str, str] = {task: group for group, tasks in GROUPS.items() for task in tasks}

SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
"""The list files of a task folder (``<split>.txt``)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

assert set(GROUP_OF) == set(NUM_CLASSES) and len(GROUP_OF) == 19


def parse_tasks(text: str) -> list[str]:
    """The tasks of a command-line ``--task`` / ``--tasks`` value: ``all``, or comma-separated names (an unknown one
    raises ``ValueError`` listing the 19)."""
    tasks = list(TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown VTAB task(s) {', '.join(unknown) or repr(text)}; tasks: {', '.join(TASKS)} (or all)")
    return tasks


def _check_task(task: str) -> None:
    if task not in NUM_CLASSES:
        raise ValueError(f"unknown VTAB-1K task {task!r}; known tasks: {', '.join(TASKS)}")


def read_list_file(path: str | Path, num_classes: int) -> list[tuple[str, int]]:
    """Parse one ``<relative image path> <label>`` list file; returns ``[(relative path, label), ...]``.

    Blank lines are skipped. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming
    the file and 1-based line number for a malformed line or a label outside ``[0, num_classes - 1]``
    (and naming the file for one that is not UTF-8 text).
    """
    return [(rel, label) for rel, label, _ in _read_list_lines(Path(path), num_classes)]


def _read_list_lines(path: Path, num_classes: int) -> list[tuple[str, int, int]]:
    """:func:`read_list_file` with each entry's 1-based line number."""
    if not path.is_file():
        raise FileNotFoundError(f"VTAB list file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); save the list file as UTF-8"
                         ) from exc
    samples: list[tuple[str, int, int]] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: malformed line {line!r}; expected '<image path> <label>'")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: malformed line {line!r}; label {label_text!r} is not an integer"
            ) from None
        if not 0 <= label < num_classes:
            raise ValueError(
                f"{path}:{lineno}: label {label} out of range; valid labels are 0..{num_classes - 1} "
                f"({num_classes} classes)"
            )
        samples.append((rel, label, lineno))
    return samples


def load_image(path: str | Path, image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Read an image as a normalised ``float32`` tensor ``(3, image_size, image_size)``.

    RGB conversion, bicubic resize with PIL, scale to [0, 1], then ``(x - mean) / std`` per channel.
    An unreadable or corrupt file raises ``OSError`` with its path in the message.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
            array = np.asarray(img, dtype=np.uint8).copy()
    except UnidentifiedImageError as exc:
        raise OSError(f"cannot read image {path}: not an image file PIL can decode (corrupt or another format)"
                      ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise OSError(f"cannot read image {path}: {exc}") from exc
    x = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


class VTabDataset(Dataset):
    """One split of one VTAB-1K task: items are ``(pixel_values (3, S, S) float32, label int)``.

    ``root`` holds the task folders; ``split`` is one of :data:`SPLITS`. ``mean``/``std`` default to
    ImageNet's (pass ``(0.5,) * 3`` for models trained with that normalisation). Validation is eager:
    unknown task or split, missing list file, malformed line, out-of-range label, missing image file
    all raise at construction with the offending path (and line) in the message.

    Attributes: ``task``, ``split``, ``task_dir``, ``num_classes``, ``samples`` (list of
    ``(absolute image path, label)``), ``labels``.
    """

    def __init__(self, root: str | Path, task: str, split: str, image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        _check_task(task)
        if split not in SPLITS:
            raise ValueError(f"unknown VTAB-1K split {split!r}; known splits: {', '.join(SPLITS)}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {tuple(mean)} and {tuple(std)}")
        if any(v <= 0 for v in std):
            raise ValueError(f"std values must be positive, got {tuple(std)}")
        self.task = task
        self.split = split
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.num_classes = NUM_CLASSES[task]
        self.task_dir = Path(root) / task
        list_path = self.task_dir / f"{split}.txt"
        entries = _read_list_lines(list_path, self.num_classes)
        inside = self.task_dir.resolve()
        self.samples: list[tuple[Path, int]] = []
        self.lines: list[int] = []  # each sample's line in the list file, for error messages
        for rel, label, lineno in entries:
            image_path = self.task_dir / rel
            # resolve() follows symlinks and "..", so neither can reach files outside the task folder
            if not image_path.resolve().is_relative_to(inside):
                raise ValueError(f"{list_path}:{lineno}: image path {rel!r} points outside the task folder "
                                 f"{self.task_dir}; list paths are relative to <root>/<task>/ and stay inside it")
            if not image_path.is_file():
                raise FileNotFoundError(f"VTAB image not found: {image_path} (listed in {list_path}:{lineno})")
            self.samples.append((image_path, label))
            self.lines.append(lineno)
        self.list_path = list_path

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            return load_image(path, self.image_size, self.mean, self.std), label
        except OSError as exc:
            raise OSError(f"{exc} (listed in {self.list_path}:{self.lines[index]})") from exc

    def __repr__(self) -> str:
        return (f"VTabDataset(task={self.task!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, image_size={self.image_size})")


def group_means(accuracies: Mapping[str, float]) -> dict[str, float]:
    """Aggregate per-task VTAB-1K accuracies.

    Returns ``{"Natural", "Specialized", "Structured"}`` (mean over the tasks of each group that are
    present), ``"mean_all_tasks"`` (plain mean over every task given; with all 19 tasks this is the
    "Avg"/"Mean" column of the NOAH / FacT / LoRA-style PEFT tables that the Lily paper compares
    against) and ``"mean_of_groups"`` (mean of the three group means, the other convention some papers,
    e.g. VPT-style summaries, use). A group with no task present is left out, and ``mean_of_groups`` is
    only given when all three groups are present. Units are whatever was passed in (fractions or %).
    Unknown task names raise ``ValueError``; an empty mapping returns ``{}``.
    """
    for task in accuracies:
        _check_task(task)
    out: dict[str, float] = {}
    for group, tasks in GROUPS.items():
        values = [float(accuracies[t]) for t in tasks if t in accuracies]
        if values:
            out[group] = math.fsum(values) / len(values)
    if accuracies:
        out["mean_all_tasks"] = math.fsum(float(v) for v in accuracies.values()) / len(accuracies)
    if all(g in out for g in GROUPS):
        out["mean_of_groups"] = math.fsum(out[g] for g in GROUPS) / len(GROUPS)
    return out


# ----------------------------------------------------------------------------------------------------
# Generated stand-in data
# ----------------------------------------------------------------------------------------------------

def _class_colour(c: int, classes: int) -> np.ndarray:
    """A distinct saturated RGB colour per class (hue spread around the circle)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(c / max(classes, 1), 0.85, 0.9)
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _fake_image(c: int, classes: int, size: int, rng: random.Random) -> Image.Image:
    """Class ``c``: its own colour, stripes at its own angle and frequency, plus per-sample jitter."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size, 1)
    angle = math.pi * c / max(classes, 1) + rng.uniform(-0.1, 0.1)
    freq = 2.0 + (c % 4) + rng.uniform(-0.2, 0.2)
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    colour = _class_colour(c, classes)
    background = np.array([20.0, 20.0, 20.0], dtype=np.float32)
    img = background + stripes[..., None] * (colour - background)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 8.0, size=img.shape)
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))


def write_fake_vtab(root: str | Path, task: str, classes: int | None = None, per_class: int = 4, image_size: int = 32,
                    seed: int = 0, per_class_test: int | None = None) -> Path:
    """Write a small generated VTAB-1K task folder ``<root>/<task>/`` and return its path
    (``lily-ssm fake-vtab``).

    Labels ``0..classes-1`` (default ``min(3, the task's class count)``; at most the task's real class count, so
    the folder passes :class:`VTabDataset` validation). ``train800`` and ``val200`` get ``per_class`` images per
    class, ``test`` gets ``per_class_test`` (default ``per_class``), and ``train800val200`` lists the
    union of train800 and val200. Images are PNGs under ``images/``; each class has its own colour and
    stripe angle/frequency, with per-image jitter and noise, so a tiny model can learn them.
    """
    _check_task(task)
    classes = min(3, NUM_CLASSES[task]) if classes is None else classes
    if not 1 <= classes <= NUM_CLASSES[task]:
        raise ValueError(f"classes must be in 1..{NUM_CLASSES[task]} for task {task!r}, got {classes}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    per_class_test = per_class if per_class_test is None else per_class_test
    rng = random.Random(seed)
    task_dir = Path(root) / task
    image_dir = task_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {}
    for split, n in (("train800", per_class), ("val200", per_class), ("test", per_class_test)):
        rows = []
        for c in range(classes):
            for i in range(n):
                rel = f"images/{split}_{c:03d}_{i:04d}.png"
                _fake_image(c, classes, image_size, rng).save(task_dir / rel)
                rows.append(f"{rel} {c}")
        rng.shuffle(rows)
        lines[split] = rows
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split in SPLITS:  # the lists last, each whole: an interrupted write leaves no list naming a missing image
        write_atomic(task_dir / f"{split}.txt", "".join(row + "\n" for row in lines[split]))
    return task_dir
