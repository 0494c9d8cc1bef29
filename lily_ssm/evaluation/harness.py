"""lm-evaluation-harness backend ``lily``: lm-eval's ``HFLM`` with a lily-ssm adapter loaded.

    lm_eval --model lily --model_args pretrained=<hub id or folder>,adapter=<adapter folder> ...

``pretrained`` may also be a mamba-ssm checkpoint (a ``MambaLMHeadModel`` folder, as lm-eval's ``mamba_ssm``
backend loads): it is scored as its equivalent transformers model, with the folder's tokenizer or the given one
(GPT-NeoX's by default, as the ``mamba_ssm`` backend does). lm-eval versions that read the ``lm_eval.models``
entry points find the backend through lily-ssm's package metadata; for older ones, importing this module
registers it (``lily-ssm lm-eval`` does it for you). Everything else
— dtype, device, batch_size, max_length, loglikelihood, rolling loglikelihood, generation — is HFLM's.
One addition: HFLM scores loglikelihood requests in right-padded batches without an attention mask;
this backend passes the mask, so Lily's routers ignore the padding and results do not depend on
the batch size. And one refusal: a loglikelihood request feeds context and continuation in one
forward, so ``sequence`` / ``batch`` routing would let the continuation steer its own score; such
adapters are scored only with ``allow_lookahead`` set (generation tasks are fine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models import huggingface as _hf
from lm_eval.models.huggingface import HFLM

from ..models.loading import resolve_model_path
from ..models.mamba_ssm_checkpoint import (
    MambaSsmCheckpointError,
    adopt_tokenizer,
    load_mamba_ssm_model,
    mamba_ssm_folder,
    read_mamba_ssm_config,
    tokenizer_source,
    transformers_config,
)
from ..modules.registry import patch_mamba_mixers
from ..persistence import check_adapter_folder, load_adapter
from ..tuners.lily.config import LOOKAHEAD_MODES
from ..tuners.model import ADAPTER_ATTR


@register_model("lily")
class LilyLM(HFLM):
    """``HFLM`` plus ``adapter=<folder or org/name>`` (a lily-ssm or PEFT adapter, a Hub id at
    ``adapter_revision``; optional, to score the base alone) and ``allow_lookahead=True`` to score a
    ``sequence`` / ``batch``-routed adapter anyway."""

    def __init__(self, pretrained: Any, adapter: str | None = None, allow_lookahead: bool = False,
                 adapter_revision: str | None = None, **kwargs: Any) -> None:
        self.allow_lookahead = allow_lookahead
        if adapter is not None:  # a missing, damaged or unreachable adapter fails before the model loads
            adapter = check_adapter_folder(str(adapter), adapter_revision)
        self._mamba_ssm: Path | None = None
        if isinstance(pretrained, str):  # so does a missing model, or a Hub id offline (in seconds)
            pretrained = resolve_model_path(pretrained)
            self._mamba_ssm = mamba_ssm_folder(pretrained)
            if self._mamba_ssm is not None:
                for option in ("peft", "delta", "autogptq", "gptqmodel", "gguf_file", "parallelize", "tp_plan"):
                    if kwargs.get(option):
                        raise MambaSsmCheckpointError(
                            f"{option}={kwargs[option]!r} is not available with the mamba-ssm checkpoint {pretrained}; "
                            "give a lily-ssm or PEFT adapter as adapter=..., or leave it out")
        kwargs.setdefault("backend", "causal")
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, **kwargs)
        self._row_lengths: list[int] | None = None
        if adapter is not None:  # also onto a model passed in already adapted (same config), never skipped
            load_adapter(self.model, adapter)
        patch_mamba_mixers(self.model)  # the base alone runs lily-ssm's mixers too (no-op once adapted)
        self.model.eval()

    def _get_config(self, pretrained: str, **kwargs: Any) -> None:
        if self._mamba_ssm is None:
            return super()._get_config(pretrained, **kwargs)
        self._config = transformers_config(read_mamba_ssm_config(self._mamba_ssm))

    def _create_tokenizer(self, pretrained: Any, tokenizer: Any, **kwargs: Any) -> None:
        if self._mamba_ssm is not None and not tokenizer:
            tokenizer = tokenizer_source(self._mamba_ssm, None)
        super()._create_tokenizer(pretrained, tokenizer, **kwargs)

    def _create_model(self, pretrained: str, dtype: str | torch.dtype | None = "auto", **kwargs: Any) -> None:
        if self._mamba_ssm is None:
            return super()._create_model(pretrained, dtype=dtype, **kwargs)
        self._model = load_mamba_ssm_model(self._mamba_ssm, _hf.get_dtype(dtype), device_map=kwargs.get("device_map"),
                                           name=pretrained)
        adopt_tokenizer(self._model, self.tokenizer, self._mamba_ssm)
        self._config = self._model.config

    @contextlib.contextmanager
    def _recording_row_lengths(self) -> Iterator[None]:
        """Remember the true length of each row HFLM right-pads, for the attention mask."""
        original = _hf.pad_and_concat

        def recording(max_length: int, tensors: list[torch.Tensor], padding_side: str = "right") -> torch.Tensor:
            self._row_lengths = [int(t.shape[-1]) for t in tensors] if padding_side == "right" else None
            return original(max_length, tensors, padding_side=padding_side)

        _hf.pad_and_concat = recording
        try:
            yield
        finally:
            _hf.pad_and_concat = original
            self._row_lengths = None

    def _check_scoring_routing(self) -> None:
        state = getattr(self.model, ADAPTER_ATTR, None)
        config = getattr(state, "config", None)
        routing = getattr(config, "routing", None)
        if routing in LOOKAHEAD_MODES and not (config.allow_lookahead or self.allow_lookahead):
            raise ValueError(
                f"the adapter uses routing={routing!r}: a loglikelihood request scores context and continuation "
                "in one forward, so its router mix would include the continuation and the answer would steer "
                "its own score. Score adapters trained with causal routing (the default), use generation "
                "tasks, or pass model_args allow_lookahead=True to accept this")

    def _loglikelihood_tokens(self, requests: Any, disable_tqdm: bool = False, override_bs: int | None = None):
        self._check_scoring_routing()
        with self._recording_row_lengths():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        lengths = self._row_lengths
        if attn_mask is not None or labels is not None or lengths is None or len(lengths) != inps.shape[0]:
            return super()._model_call(inps, attn_mask, labels)
        positions = torch.arange(inps.shape[1], device=inps.device)
        mask = (positions[None, :] < torch.tensor(lengths, device=inps.device)[:, None]).long()
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(inps, attention_mask=mask).logits


def run_cli(argv: list[str]) -> int:
    """``lm_eval``'s own command line with the ``lily`` backend registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
