"""A short self-contained demo: Lily on a tiny Falcon-Mamba, trained for a few steps on CPU.

No downloads: the model is built from a config with random weights, and the task is generated
(predict the next token of sequences that count upward modulo the vocabulary).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .persistence import load_adapter, save_adapter
from .report import parameter_report
from .tuners import LilyConfig, apply_adapter


def tiny_falcon_mamba(vocab: int = 32, hidden: int = 64, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    torch.manual_seed(seed)
    config = FalconMambaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, state_size=8,
                               num_hidden_layers=layers, time_step_rank=8, conv_kernel=4)
    return FalconMambaForCausalLM(config)


def counting_batch(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (start + torch.arange(length)) % vocab


def run_demo(steps: int = 60, seed: int = 0, out_dir: str | Path = "lily-demo-adapter", log=print) -> dict:
    """Inject Lily into ``in_proj`` and ``dt_proj`` of a tiny Falcon-Mamba and train it; returns losses."""
    model = tiny_falcon_mamba(seed=seed)
    vocab = model.config.vocab_size
    config = LilyConfig(["in_proj", "dt_proj"], r=8, num_A=2, num_B=4, routing="sequence",
                        overrides={"dt_proj": {"r": 4, "num_B": 1}})
    apply_adapter(model, config)
    log(str(parameter_report(model)))

    gen = torch.Generator().manual_seed(seed + 1)
    held_out = counting_batch(16, 32, vocab, torch.Generator().manual_seed(seed + 2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(held_out, labels=held_out).loss.item()

    before = eval_loss()
    log(f"held-out loss before training: {before:.3f}")
    start = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        batch = counting_batch(8, 32, vocab, gen)
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, steps // 6) == 0 or step == steps:
            log(f"step {step:4d}/{steps}  train loss {loss.item():.3f}  ({time.perf_counter() - start:.1f}s)")
    after = eval_loss()
    log(f"held-out loss after training:  {after:.3f}")

    folder = save_adapter(model, out_dir)
    reloaded = load_adapter(tiny_falcon_mamba(seed=seed), folder)
    reloaded.eval()
    with torch.no_grad():
        reloaded_loss = reloaded(held_out, labels=held_out).loss.item()
    log(f"adapter saved to {folder}/ and reloaded onto a fresh base: loss {reloaded_loss:.3f}")
    return {"loss_before": before, "loss_after": after, "loss_reloaded": reloaded_loss, "adapter": str(folder)}
