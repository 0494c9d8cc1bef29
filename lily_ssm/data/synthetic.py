"""Generated stand-ins for the eight commonsense tasks, for the offline quickstart.

All eight tasks draw on one small "world": eight kinds of things (fruit, tools, vehicles, ...), eight
things of each kind. Each task asks a question of its own, in its LLM-Adapters format, whose answer is
the option of the kind that question is about (piqa: repairing needs a tool; winogrande: the cold
need clothing; boolq: true when the thing is edible; ...). A model learns each task's rule from
training items and applies it to held-out items: new combinations of question wording, options and
positions. The correct answer sits at a uniformly spread position, so chance is ``1 / num_options``.

:func:`pretraining_corpus` gives general knowledge (which thing is of which kind) and texts in the
tasks' formats whose answers are random, so a base model pre-trained on them answers in the right
format but at chance.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.atomic import write_atomic
from .prompts import TASKS, training_prompt

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"),
    "vegetable": ("carrot", "potato", "onion", "cabbage", "pepper", "spinach", "celery", "turnip"),
    "animal": ("cat", "dog", "horse", "lion", "mouse", "rabbit", "tiger", "wolf"),
    "tool": ("hammer", "wrench", "saw", "drill", "shovel", "chisel", "pliers", "axe"),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "boat", "plane", "tractor"),
    "furniture": ("chair", "table", "sofa", "bed", "desk", "shelf", "stool", "cabinet"),
    "instrument": ("guitar", "piano", "violin", "drum", "flute", "trumpet", "harp", "cello"),
    "clothing": ("shirt", "jacket", "scarf", "glove", "hat", "sock", "coat", "boot"),
}
CATEGORY_OF: dict[str, str] = {item: cat for cat, items in CATEGORIES.items() for item in items}
NAMES = ("alex", "sam", "maria", "kai", "lena", "omar", "ruth", "tom", "nina", "jack")
PLACES = ("kitchen", "garage", "garden", "attic", "shop", "school")


@dataclass(frozen=True)
class TaskSpec:
    """How one task's items are made: the kinds that answer its questions, its wording and layout."""

    num_options: int
    label: str  # option label in the instruction ("Answer" -> "Answer1: ..."); "" for boolq
    lead: str  # the LLM-Adapters opening of the instruction
    targets: tuple[str, ...]  # the kinds of thing that are correct answers
    questions: tuple[str, ...]  # templates with {name}, {place} (fillers) and, for boolq, {thing}
    option: str = "{item}"


SPECS: dict[str, TaskSpec] = {
    "boolq": TaskSpec(
        2, "", "Please answer the following question with true or false, question: ", ("fruit", "vegetable"),
        ("can you eat the {thing}?", "{name} found the {thing} in the {place}. is it good to eat the {thing}?")),
    "piqa": TaskSpec(
        2, "Solution", "Please choose the correct solution to the question: ", ("tool",),
        ("how can {name} fix the broken door of the {place}? use the", "to repair the roof of the {place}, take the")),
    "social_i_qa": TaskSpec(
        3, "Answer", "Please choose the correct answer to the question: ", ("instrument",),
        ("{name} wanted to play a song in the {place}. what did {name} pick up?",
         "{name} joined the school band. what will {name} need?")),
    "hellaswag": TaskSpec(
        4, "Ending", "Please choose the correct ending to complete the given sentence: ", ("vehicle",),
        ("Travel: {name} has to get to the {place} far away, so {name}",
         "Commuting: {name} is late for work at the {place}, so {name}"),
        option="rides the {item} there."),
    "winogrande": TaskSpec(
        2, "Option", "Please choose the correct answer to fill in the blank to complete the given sentence: ",
        ("clothing",),
        ("{name} felt cold in the {place}, so {name} put on the _ .", "it was snowing, so {name} wore the _ outside.")),
    "ARC-Easy": TaskSpec(
        4, "Answer", "Please answer the following question: ", ("fruit",),
        ("which fruit grows on a tree and tastes sweet?", "which of these is a fruit, the sweet part of a plant?")),
    "ARC-Challenge": TaskSpec(
        4, "Answer", "Please answer the following question: ", ("animal",),
        ("which animal is a living thing that can move on its own?",
         "which of these is an animal that needs to breathe air?")),
    "openbookqa": TaskSpec(
        4, "Answer", "Please choose the correct answer to the question: ", ("furniture",),
        ("{name} moved into an empty house. which furniture would {name} put in the {place}?",
         "which piece of furniture could {name} sit on or keep things on?")),
}
NUM_OPTIONS: dict[str, int] = {task: spec.num_options for task, spec in SPECS.items()}


def _check_task(task: str) -> None:
    if task not in NUM_OPTIONS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(NUM_OPTIONS)}")


def answer_choices(task: str) -> list[str]:
    """The lower-case answers a ``task`` allows, in order (e.g. ``answer1..answer4`` for ARC)."""
    _check_task(task)
    if task == "boolq":
        return ["true", "false"]
    return [f"{SPECS[task].label.lower()}{i}" for i in range(1, NUM_OPTIONS[task] + 1)]


def _instruction(task: str, question: str, options: list[str]) -> str:
    """The LLM-Adapters layout: lead + question, one ``LabelK: text`` block per option, answer format."""
    spec = SPECS[task]
    parts = [spec.lead + question]
    parts += [f"{spec.label}{i}: {text}" for i, text in enumerate(options, 1)]
    parts.append("Answer format: " + "/".join(answer_choices(task)))
    return "\n\n".join(parts)


def _fill(template: str, rng: random.Random, **values: str) -> str:
    return template.format(name=rng.choice(NAMES), place=rng.choice(PLACES), **values)


def _build(task: str, position: int, rng: random.Random) -> tuple[str, str]:
    """One item of ``task`` whose correct answer is choice number ``position`` (0-based)."""
    spec = SPECS[task]
    others = [c for c in CATEGORIES if c not in spec.targets]
    template = rng.choice(spec.questions)
    if task == "boolq":
        thing = rng.choice(CATEGORIES[rng.choice(spec.targets if position == 0 else others)])
        return _instruction(task, _fill(template, rng, thing=thing), []), answer_choices(task)[position]
    items = [rng.choice(CATEGORIES[c]) for c in rng.sample(others, spec.num_options - 1)]
    items.insert(position, rng.choice(CATEGORIES[rng.choice(spec.targets)]))
    options = [spec.option.format(item=item) for item in items]
    return _instruction(task, _fill(template, rng), options), answer_choices(task)[position]


def _item(instruction: str, answer: str) -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def make_task_items(task: str, n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """``n`` distinct items of ``task`` (``instruction``, ``input``, ``output``, ``answer``).

    Correct positions are balanced (each choice ``n // num_options`` or one more times) and shuffled.
    Instructions in ``exclude`` are never produced, so held-out items can be kept out of training.
    """
    _check_task(task)
    if n < 0:
        raise ValueError(f"n={n}; must be >= 0")
    rng = random.Random(f"{task}:{seed}")
    k = NUM_OPTIONS[task]
    positions = [i % k for i in range(n)]
    rng.shuffle(positions)
    seen, items = set(exclude), []
    for position in positions:
        for _ in range(1000):
            instruction, answer = _build(task, position, rng)
            if instruction not in seen:
                break
        else:
            raise ValueError(f"task {task!r}: could not find {n} distinct items (got {len(items)}); ask for fewer")
        seen.add(instruction)
        items.append(_item(instruction, answer))
    return items


def write_synthetic_commonsense(root: str | Path, train_per_task: int, test_per_task: int,
                                seed: int = 0) -> dict[str, Any]:
    """Write ``<root>/commonsense_170k.json`` (all tasks' training items, shuffled) and
    ``<root>/<task>/test.json`` for the eight tasks; held-out items never appear in training.

    Returns ``{"root", "train_file", "train_items", "test_files": {task: path}, "test_items": {task: n}}``.
    """
    if train_per_task < 1 or test_per_task < 1:
        raise ValueError(f"train_per_task={train_per_task}, test_per_task={test_per_task}; both must be >= 1")
    root = Path(root)
    train: list[dict] = []
    test_files: dict[str, str] = {}
    for task in TASKS:
        test = make_task_items(task, test_per_task, seed=2 * seed + 1)
        held_out = {row["instruction"] for row in test}
        rows = make_task_items(task, train_per_task, seed=2 * seed, exclude=held_out)
        if not held_out.isdisjoint(row["instruction"] for row in rows):  # make_task_items' exclude guarantees it
            raise RuntimeError(f"task {task!r}: held-out items leaked into the training items")
        path = root / task / "test.json"
        write_atomic(path, json.dumps(test, indent=1) + "\n")
        test_files[task] = str(path)
        train.extend(rows)
    random.Random(seed).shuffle(train)
    train_file = root / "commonsense_170k.json"
    write_atomic(train_file, json.dumps(train, indent=1) + "\n")
    return {"root": str(root), "train_file": str(train_file), "train_items": len(train),
            "test_files": test_files, "test_items": {task: test_per_task for task in TASKS}}


FACT_SHARE = 3  # one pre-training text in FACT_SHARE is general knowledge, the rest are task prompts
FACTS_PER_TEXT = 4


def pretraining_corpus(n: int, seed: int) -> list[str]:
    """``n`` texts for pre-training a base model: general knowledge about the world's things, and full
    prompts in the eight tasks' formats whose answers are drawn uniformly at random.

    They teach the prompt layout, the phrasing ``the correct answer is <answer>`` and what kind each
    thing is, but not the tasks' rules, so the pre-trained base answers in format at chance.
    """
    if n < 0:
        raise ValueError(f"n={n}; must be >= 0")
    rng = random.Random(f"pretrain:{seed}")
    tasks = list(SPECS)
    texts = [_facts(rng) for _ in range(n // FACT_SHARE)]
    for index in range(n - len(texts)):
        task = tasks[index % len(tasks)]
        instruction, _ = _build(task, rng.randrange(NUM_OPTIONS[task]), rng)
        texts.append(training_prompt(instruction, "", f"the correct answer is {rng.choice(answer_choices(task))}",
                                     protocol="clean"))
    rng.shuffle(texts)
    return texts


def _facts(rng: random.Random) -> str:
    """General knowledge: which things are of which kind."""
    sentences = []
    for _ in range(FACTS_PER_TEXT):
        cat = rng.choice(list(CATEGORIES))
        if rng.random() < 0.5:
            sentences.append(f"the {rng.choice(CATEGORIES[cat])} is a kind of {cat}.")
        else:
            sentences.append(f"some kinds of {cat}: " + ", ".join(rng.sample(CATEGORIES[cat], 3)) + ".")
    return " ".join(sentences)


def vocabulary_texts() -> list[str]:
    """Texts that together hold every word the generated data can contain (to build a tokenizer)."""
    texts = [" ".join([*CATEGORIES, *CATEGORY_OF, *NAMES, *PLACES]), training_prompt("x", "y", "z", protocol="clean"),
             _facts(random.Random(0)), "the correct answer is"]
    for task, spec in SPECS.items():
        options = [spec.option.format(item="")] * spec.num_options
        texts.append(training_prompt(_instruction(task, "", options), "", " ".join(answer_choices(task)),
                                     protocol="clean"))
        texts.extend(q.format(name="", place="", thing="") for q in spec.questions)
    return texts
