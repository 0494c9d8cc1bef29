"""The quickstart's base model: a tiny Falcon-Mamba with a word-level tokenizer, pre-trained offline.

Everything is generated on the machine (no hub): the tokenizer's vocabulary comes from the synthetic
data (:mod:`lily_ssm.data.synthetic`), the model from a ``FalconMambaConfig``, and the pre-training
corpus teaches the prompt format and answer phrasing with random answers, so the base answers in
format but at chance until an adapter is tuned on the tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
MARKER = "quickstart_base.json"  # written last: its presence marks a finished base
FORMAT_VERSION = 1

# Sizes and schedule of the built-in base (measured on 2 CPU threads; see build_quickstart_base).
QUICKSTART = {"hidden": 96, "layers": 4, "state_size": 8, "corpus_size": 4000, "steps": 150, "batch_size": 32,
              "lr": 3e-3}


def build_word_tokenizer(texts: list[str]):
    """A lower-casing word-level ``PreTrainedTokenizerFast`` over the words and punctuation in ``texts``.

    Ids 0-3 are ``<pad>``, ``<unk>``, ``<s>`` (prepended to every encoded text) and ``</s>``; decoding
    joins words with spaces (``"the correct answer is answer3"``).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str) or not texts:
        raise ValueError(f"texts must be a non-empty list of strings, got {type(texts).__name__} of length "
                         f"{len(texts) if hasattr(texts, '__len__') else '?'}")
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Whitespace()  # words (\w+) and runs of punctuation
    words = sorted({w for text in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({w: i for i, w in enumerate((w for w in words if w not in vocab), start=len(vocab))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_falcon_mamba(vocab_size: int, seed: int = 0, hidden: int = QUICKSTART["hidden"],
                      layers: int = QUICKSTART["layers"], state_size: int = QUICKSTART["state_size"]):
    """A randomly initialised ``FalconMambaForCausalLM`` (tied embeddings) whose special ids match
    :func:`build_word_tokenizer`."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    for name, value in (("vocab_size", vocab_size), ("hidden", hidden), ("layers", layers),
                        ("state_size", state_size)):
        if value < 1:
            raise ValueError(f"{name}={value}; must be >= 1")
    config = FalconMambaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, state_size=state_size,
        num_hidden_layers=layers, time_step_rank=max(4, math.ceil(hidden / 16)), conv_kernel=4,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        return FalconMambaForCausalLM(config)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [row + [tokenizer.eos_token_id] for row in ids]


def _batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def pretrain(model, tokenizer, texts: list[str], steps: int, batch_size: int, lr: float, seed: int,
             log: Callable[[str], Any] = print) -> list[float]:
    """Full-parameter causal-LM training on ``texts`` (random batches, AdamW, warmup then cosine decay).

    Uses lily-ssm's mixer forward while training (same math as transformers', faster on CPU) and
    restores the model's own forward afterwards. Returns the loss of every step.
    """
    from ..modules.registry import patch_mamba_mixers, unpatch_mamba_mixers

    if steps < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, lr={lr}; need steps >= 0, batch_size >= 1, lr > 0")
    if not texts:
        raise ValueError("texts is empty; nothing to pre-train on")
    rows = _encode(tokenizer, texts)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps))))
    patched = patch_mamba_mixers(model)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    try:
        for step in range(1, steps + 1):
            ids, mask, labels = _batch(rng.sample(rows, min(batch_size, len(rows))), tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % max(1, steps // 5) == 0 or step == steps:
                log(f"pre-training step {step}/{steps}: loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                    f"({time.perf_counter() - start:.0f}s)")
    finally:
        model.eval()
        if patched:
            unpatch_mamba_mixers(model)
    return losses


def _settings(seed: int, overrides: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """What a base is built from; a cached base is reused only when they all agree (data included)."""
    unknown = sorted(set(overrides) - set(QUICKSTART))
    if unknown:
        raise TypeError(f"unknown quickstart setting(s) {', '.join(unknown)}; known: {', '.join(QUICKSTART)}")
    data = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    return {"format": FORMAT_VERSION, "seed": seed, **QUICKSTART, **overrides, "data_sha256": data}


def _finished(folder: Path, settings: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("settings") == settings
    except (OSError, ValueError):
        return False


def build_quickstart_base(folder: str | os.PathLike, seed: int = 0, log: Callable[[str], Any] = print,
                          **overrides: Any) -> Path:
    """Build, pre-train and save (``save_pretrained``) the quickstart base model and tokenizer in ``folder``.

    A folder that already holds a base built with the same settings is reused as is. ``overrides``
    change :data:`QUICKSTART` settings (``hidden``, ``layers``, ``state_size``, ``corpus_size``,
    ``steps``, ``batch_size``, ``lr``), e.g. ``steps=2`` for a quick test. The folder is written
    atomically: built in a temporary folder beside it, then renamed into place.
    """
    from ..data.synthetic import pretraining_corpus, vocabulary_texts

    folder = Path(folder)
    start = time.perf_counter()
    corpus = pretraining_corpus({**QUICKSTART, **overrides}["corpus_size"], seed)
    vocabulary = corpus + vocabulary_texts()
    settings = _settings(seed, overrides, vocabulary)
    if _finished(folder, settings):
        log(f"using the quickstart base model in {folder}")
        return folder
    if folder.exists() and (not folder.is_dir() or (not (folder / MARKER).is_file() and any(folder.iterdir()))):
        raise FileExistsError(f"{folder} exists and is not a quickstart base folder; remove it or choose another")
    tokenizer = build_word_tokenizer(vocabulary)
    model = tiny_falcon_mamba(len(tokenizer), seed, settings["hidden"], settings["layers"], settings["state_size"])
    log(f"building the quickstart base model in {folder}: vocabulary {len(tokenizer)}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {settings['steps']} pre-training steps")
    losses = pretrain(model, tokenizer, corpus, settings["steps"], settings["batch_size"], settings["lr"], seed, log)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"settings": settings, "final_loss": losses[-1] if losses else None,
                  "seconds": round(time.perf_counter() - start, 1)}
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        _move_into_place(tmp, folder, settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"quickstart base model saved to {folder} ({time.perf_counter() - start:.0f}s)")
    return folder


def _move_into_place(tmp: Path, folder: Path, settings: dict[str, Any]) -> None:
    """Rename ``tmp`` to ``folder``, replacing a stale base; if another process finished first, keep its."""
    if folder.exists() and (folder / MARKER).is_file() and not _finished(folder, settings):
        shutil.rmtree(folder)  # a base built with other settings (or an older version)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not _finished(folder, settings):
            raise
