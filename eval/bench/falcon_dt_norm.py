"""Does a Falcon-Mamba train the function it is evaluated with? Stock transformers against lily-ssm, on the GPU.

Stock transformers (before 5.25, with mamba-ssm and causal-conv1d installed) trains Falcon-Mamba through
``mamba_inner_fn(..., dt_rms_weight=...)``, which RMS-normalises Δ after ``dt_proj`` (over d_inner); its evaluation
path normalises ``time_step`` before ``dt_proj`` (over dt_rank), the form the released checkpoint is evaluated
with (docs/design.md §3). This script builds a randomly initialised Falcon-Mamba at the 7B width and prints the
relative distance ``‖a − b‖ / ‖b‖`` between logits:

- stock, train mode (gradients on, no cache) against stock, eval mode;
- lily-ssm, train mode against lily-ssm, eval mode;
- lily-ssm, eval mode against stock, eval mode.

    python eval/bench/falcon_dt_norm.py [--layers 2] [--tokens 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import json

import torch


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import transformers
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    from lily_ssm.modules import patch_mamba_mixers, unpatch_mamba_mixers

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=65024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                               num_hidden_layers=args.layers, state_size=16, time_step_rank=max(1, args.hidden // 16),
                               conv_kernel=4, use_cache=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = FalconMambaForCausalLM(config).to(dtype)
    ids = torch.randint(2, 65024, (args.batch, args.tokens), device=device)

    def logits(train: bool) -> torch.Tensor:
        model.train(train)
        with torch.set_grad_enabled(train):
            return model(input_ids=ids, use_cache=False).logits.detach()

    stock = {"train": logits(True), "eval": logits(False)}
    patch_mamba_mixers(model)
    ours = {"train": logits(True), "eval": logits(False)}
    unpatch_mamba_mixers(model)
    result = {
        "transformers": transformers.__version__, "torch": torch.__version__, "device": str(device),
        "layers": args.layers, "tokens": args.tokens,
        "stock train vs stock eval": relative(stock["train"], stock["eval"]),
        "lily-ssm train vs lily-ssm eval": relative(ours["train"], ours["eval"]),
        "lily-ssm eval vs stock eval": relative(ours["eval"], stock["eval"]),
    }
    for key, value in result.items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
