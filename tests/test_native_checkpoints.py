"""mamba-ssm's own checkpoints (MambaLMHeadModel folders: config.json + pytorch_model.bin) load as the equivalent
transformers model, logit for logit against mamba-ssm itself (its published sources run on CPU, with its kernels
swapped for its own PyTorch references: tests/mamba_ssm_oracle.py) and against its module math written out below;
adapters trained on them save and load against the folder; the lily lm-eval backend takes them as pretrained=."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from upstream_sources import MAMBA_SSM, fetch_or_skip

import lily_ssm
from lily_ssm.models.loading import load_model_and_tokenizer
from lily_ssm.models.mamba_ssm_checkpoint import MambaSsmCheckpointError, mamba_ssm_folder, transformers_config
from lily_ssm.models.tiny import build_word_tokenizer
from lily_ssm.utils import hub_access

WORDS = "the cat sat on a mat and dog ran far away from home today".split()


# --- mamba-ssm's reference semantics (mamba_ssm/ops/selective_scan_interface.py: selective_scan_ref;
# --- mamba_ssm/modules/mamba_simple.py, mamba2.py, block.py, models/mixer_seq_simple.py; layernorm_gated.rms_norm_ref),
# --- computed straight from the native state dict, position by position.

def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def causal_conv_silu(x, weight, bias):
    """Depthwise causal convolution then SiLU; x is (batch, channels, length)."""
    k = weight.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]])


def mamba1_mixer(sd, p, h, ssm):
    d_state, dt_rank = ssm["d_state"], sd[p + "dt_proj.weight"].shape[1]
    xz = (h @ sd[p + "in_proj.weight"].T).transpose(1, 2)  # (b, 2 d_inner, l)
    x, z = xz.chunk(2, dim=1)
    x = causal_conv_silu(x, sd[p + "conv1d.weight"], sd.get(p + "conv1d.bias"))
    x_dbl = x.transpose(1, 2) @ sd[p + "x_proj.weight"].T  # (b, l, dt_rank + 2 n)
    dt, B, C = x_dbl.split([dt_rank, d_state, d_state], dim=-1)
    delta = F.softplus((dt @ sd[p + "dt_proj.weight"].T).transpose(1, 2) + sd[p + "dt_proj.bias"][:, None])
    A = -torch.exp(sd[p + "A_log"])  # (d_inner, n)
    state = torch.zeros(x.shape[0], x.shape[1], d_state)
    ys = []
    for t in range(x.shape[-1]):  # selective_scan_ref's recurrence
        state = torch.exp(delta[:, :, t, None] * A) * state + delta[:, :, t, None] * B[:, None, t] * x[:, :, t, None]
        ys.append((state * C[:, None, t]).sum(-1))
    y = (torch.stack(ys, dim=-1) + x * sd[p + "D"][:, None]) * F.silu(z)
    return y.transpose(1, 2) @ sd[p + "out_proj.weight"].T


def mamba2_mixer(sd, p, u, ssm, d_model):
    n, g, hd = ssm["d_state"], ssm["ngroups"], ssm["headdim"]
    d_inner = ssm["expand"] * d_model
    nheads = d_inner // hd
    z, xBC, dt = (u @ sd[p + "in_proj.weight"].T).split([d_inner, d_inner + 2 * g * n, nheads], dim=-1)
    xBC = causal_conv_silu(xBC.transpose(1, 2), sd[p + "conv1d.weight"], sd.get(p + "conv1d.bias")).transpose(1, 2)
    x, B, C = xBC.split([d_inner, g * n, g * n], dim=-1)
    b, length = x.shape[:2]
    x, B, C = x.view(b, length, nheads, hd), B.view(b, length, g, n), C.view(b, length, g, n)
    low, high = ssm.get("dt_limit", (0.0, math.inf))
    dt = F.softplus(dt + sd[p + "dt_bias"]).clamp(low, high)
    A = -torch.exp(sd[p + "A_log"])
    group = torch.arange(nheads) // (nheads // g)  # heads are split into contiguous groups
    state = torch.zeros(b, nheads, hd, n)
    ys = []
    for t in range(length):  # the SSD recurrence (ssd_minimal_discrete / the step function)
        Bt, Ct = B[:, t][:, group], C[:, t][:, group]  # (b, h, n)
        state = (torch.exp(dt[:, t] * A)[:, :, None, None] * state
                 + dt[:, t, :, None, None] * x[:, t, :, :, None] * Bt[:, :, None, :])
        ys.append((state * Ct[:, :, None, :]).sum(-1) + sd[p + "D"][:, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(b, length, d_inner)
    gated = (y * F.silu(z)).view(b, length, g, d_inner // g)  # rms_norm_ref, norm_before_gate=False, per group
    y = (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(b, length, d_inner)
    return (y * sd[p + "norm.weight"]) @ sd[p + "out_proj.weight"].T


def reference_logits(sd, cfg, ids):
    """MambaLMHeadModel.forward: embedding → per block (residual add, RMSNorm, mixer) → add, norm_f → lm_head."""
    ssm = {"d_state": 16, "ngroups": 1, "headdim": 64, "expand": 2, **cfg["ssm_cfg"]}
    hidden, residual = sd["backbone.embedding.weight"][ids], None
    for i in range(cfg["n_layer"]):
        p = f"backbone.layers.{i}."
        residual = hidden if residual is None else hidden + residual
        normed = rms_norm(residual, sd[p + "norm.weight"])
        hidden = (mamba2_mixer(sd, p + "mixer.", normed, ssm, cfg["d_model"]) if ssm.get("layer") == "Mamba2"
                  else mamba1_mixer(sd, p + "mixer.", normed, ssm))
    hidden = rms_norm(hidden + residual, sd["backbone.norm_f.weight"])
    return hidden @ sd["lm_head.weight"].T


# --- tiny random native checkpoints, shaped as mamba-ssm lays them out

def native_state_dict(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.3):
        return torch.randn(*shape, generator=gen) * std

    d, ssm = cfg["d_model"], {"d_state": 16, "d_conv": 4, "expand": 2, "ngroups": 1, "headdim": 64, **cfg["ssm_cfg"]}
    multiple = cfg.get("pad_vocab_size_multiple", 8)
    vocab = cfg["vocab_size"] + (-cfg["vocab_size"] % multiple)
    d_inner, n, k = ssm["expand"] * d, ssm["d_state"], ssm["d_conv"]
    sd = {"backbone.embedding.weight": rand(vocab, d, std=1.0), "backbone.norm_f.weight": 1 + rand(d, std=0.1)}
    for i in range(cfg["n_layer"]):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = 1 + rand(d, std=0.1)
        if ssm.get("layer") == "Mamba2":
            g, heads = ssm["ngroups"], d_inner // ssm["headdim"]
            conv = d_inner + 2 * g * n
            sd.update({p + "mixer.in_proj.weight": rand(2 * d_inner + 2 * g * n + heads, d),
                       p + "mixer.conv1d.weight": rand(conv, 1, k, std=0.5), p + "mixer.conv1d.bias": rand(conv),
                       p + "mixer.dt_bias": rand(heads) + 0.5, p + "mixer.A_log": rand(heads),
                       p + "mixer.D": 1 + rand(heads), p + "mixer.norm.weight": 1 + rand(d_inner, std=0.1),
                       p + "mixer.out_proj.weight": rand(d, d_inner)})
        else:
            r = math.ceil(d / 16) if ssm.get("dt_rank", "auto") == "auto" else ssm["dt_rank"]
            sd.update({p + "mixer.in_proj.weight": rand(2 * d_inner, d),
                       p + "mixer.conv1d.weight": rand(d_inner, 1, k, std=0.5), p + "mixer.conv1d.bias": rand(d_inner),
                       p + "mixer.x_proj.weight": rand(r + 2 * n, d_inner),
                       p + "mixer.dt_proj.weight": rand(d_inner, r),
                       p + "mixer.dt_proj.bias": rand(d_inner) + 0.5,
                       p + "mixer.A_log": torch.log(torch.arange(1, n + 1.0)).repeat(d_inner, 1) + rand(d_inner, n),
                       p + "mixer.D": 1 + rand(d_inner), p + "mixer.out_proj.weight": rand(d, d_inner)})
    tied = cfg.get("tie_embeddings", True)
    sd["lm_head.weight"] = sd["backbone.embedding.weight"] if tied else rand(vocab, d)
    return sd


MAMBA1 = {"d_model": 16, "n_layer": 2, "vocab_size": 61, "ssm_cfg": {"d_state": 4, "dt_rank": 3},
          "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
          "tie_embeddings": False}
MAMBA2 = {"d_model": 16, "d_intermediate": 0, "n_layer": 2, "vocab_size": 64,
          "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 4},
          "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
          "pad_vocab_size_multiple": 16, "tie_embeddings": True}
LAYOUTS = {"mamba1": MAMBA1, "mamba2": MAMBA2,
           "mamba2-dt-limit": {**MAMBA2, "ssm_cfg": {**MAMBA2["ssm_cfg"], "ngroups": 1, "dt_limit": [0.0, 0.6]}}}


def write_native(folder: Path, cfg: dict, seed: int = 0, tokenizer: bool = True) -> tuple[Path, dict]:
    """A mamba-ssm checkpoint folder as MambaLMHeadModel.save_pretrained writes it (plus, optionally, a tokenizer)."""
    folder.mkdir(parents=True)
    sd = native_state_dict(cfg, seed)
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        build_word_tokenizer([" ".join(WORDS)]).save_pretrained(folder)
    return folder, sd


IDS = torch.tensor([[3, 17, 42, 5, 9, 60, 1, 33, 12, 7, 50], [8, 8, 2, 19, 44, 23, 5, 0, 61, 13, 4]])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_native_checkpoint_equals_mamba_ssm_math(tmp_path, layout):
    cfg = LAYOUTS[layout]
    folder, sd = write_native(tmp_path / layout, cfg)
    model, tokenizer = load_model_and_tokenizer(str(folder), dtype="float32")
    assert type(model).__name__ == ("Mamba2ForCausalLM" if "mamba2" in layout else "MambaForCausalLM")
    assert model.config.vocab_size == 64 and len(tokenizer) <= 64
    with torch.no_grad():
        logits = model(IDS).logits
        expected = reference_logits(sd, cfg, IDS)
    assert logits.shape == expected.shape == (2, IDS.shape[1], 64)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert (model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()) == cfg["tie_embeddings"]


@pytest.fixture(scope="module")
def mamba_ssm_sdist() -> Path:
    return fetch_or_skip(MAMBA_SSM, needs=("einops", "triton"))


# MambaConfig as mamba-ssm's save_pretrained writes it, with its defaults (rms_norm, residual_in_fp32, fused_add_norm,
# tie_embeddings true) unless set; 61 words padded to 64 rows; Mamba-2 with 2 groups, and with 1 group and dt_limit.
ORACLE_LAYOUTS = {
    "mamba1": {"d_model": 32, "n_layer": 2, "vocab_size": 61, "pad_vocab_size_multiple": 16, "tie_embeddings": False,
               "ssm_cfg": {"d_state": 8, "dt_rank": 3}},
    "mamba2": {"d_model": 32, "n_layer": 2, "vocab_size": 64,
               "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 4}},
    "mamba2-dt-limit": {"d_model": 32, "n_layer": 2, "vocab_size": 64,
                        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 1, "chunk_size": 4,
                                    "dt_limit": [0.005, 0.03]}},
}


@pytest.mark.parametrize("layout", list(ORACLE_LAYOUTS))
def test_a_folder_mamba_ssm_saved_gives_mamba_ssms_own_logits(tmp_path, mamba_ssm_sdist, layout):
    folder, logits_file = tmp_path / "native", tmp_path / "oracle.safetensors"
    ids = IDS[:, :8].tolist()  # a whole number of mamba-ssm chunks, as ssd_minimal_discrete needs
    oracle = Path(__file__).with_name("mamba_ssm_oracle.py")
    done = subprocess.run([sys.executable, str(oracle), str(mamba_ssm_sdist), json.dumps(ORACLE_LAYOUTS[layout]),
                           str(folder), json.dumps(ids), str(logits_file)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    build_word_tokenizer([" ".join(WORDS)]).save_pretrained(folder)
    model, _ = load_model_and_tokenizer(str(folder), dtype="float32")
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits
    expected = load_file(logits_file)["logits"]
    assert logits.shape == expected.shape == (2, 8, 64)
    assert expected.abs().max() > 0.1  # a real signal, not near-zero logits that any model would match
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_folder_detection_and_the_tokenizer_it_falls_back_to(tmp_path):
    folder, _ = write_native(tmp_path / "m", MAMBA1, tokenizer=False)
    assert mamba_ssm_folder(str(folder)) == folder
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mamba", "d_model": 4, "n_layer": 1}))
    assert mamba_ssm_folder(str(tmp_path / "hf")) is None
    tokenizer_folder = tmp_path / "tok"
    build_word_tokenizer([" ".join(WORDS)]).save_pretrained(tokenizer_folder)
    model, tokenizer = load_model_and_tokenizer(str(folder), dtype="float32", tokenizer=str(tokenizer_folder))
    assert tokenizer("the cat")["input_ids"] and model.config.pad_token_id == tokenizer.pad_token_id
    # No tokenizer in the folder and none given: GPT-NeoX's (mamba-ssm's and lm-eval's mamba_ssm default), which
    # offline and uncached fails with a line that says what to pass.
    with pytest.raises(MambaSsmCheckpointError, match="tokenizer EleutherAI/gpt-neox-20b .*pass a local tokenizer"):
        load_model_and_tokenizer(str(folder), dtype="float32")


def test_a_hub_repository_in_mamba_ssm_layout_loads_through_its_snapshot(tmp_path, monkeypatch):
    """state-spaces/mamba-130m and its kind hold config.json + pytorch_model.bin; the Hub's downloads stand in for
    a local snapshot folder here (no network)."""
    import huggingface_hub

    snapshot, sd = write_native(tmp_path / "snapshot", MAMBA1)
    fetched = []

    def hf_hub_download(repo_id, filename, **_):
        fetched.append(filename)
        return str(snapshot / filename)

    def snapshot_download(repo_id, allow_patterns=(), **_):
        fetched.append(tuple(allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub_access, "hub_offline", lambda: False)  # the up-front check sees a reachable Hub
    monkeypatch.setattr(hub_access, "hub_unreachable", lambda: None)
    assert mamba_ssm_folder("state-spaces/mamba-tiny", weights=False) == snapshot and fetched == ["config.json"]
    model, _ = load_model_and_tokenizer("state-spaces/mamba-tiny", dtype="float32")
    assert "pytorch_model.bin" in fetched and model.config._name_or_path == "state-spaces/mamba-tiny"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference_logits(sd, MAMBA1, IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("change", "key"), [
    ({"d_intermediate": 32}, "d_intermediate=32"),
    ({"attn_layer_idx": [1]}, r"attn_layer_idx=\[1\]"),
    ({"rms_norm": False}, "rms_norm=False"),
    ({"norm_epsilon": 1e-6}, "norm_epsilon=1e-06"),
    ({"ssm_cfg": {"layer": "Mamba3"}}, "ssm_cfg.layer='Mamba3'"),
    ({"ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}}, "ssm_cfg.D_has_hdim=True"),
    ({"ssm_cfg": {"layer": "Mamba2", "rmsnorm": False}}, "ssm_cfg.rmsnorm=False"),
    ({"ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}}, "ssm_cfg.norm_before_gate=True"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_ssm": 16}}, "ssm_cfg.d_ssm=16"),
    ({"ssm_cfg": {"d_state": 4, "expand": 1.5}}, "ssm_cfg.expand=1.5"),
    ({"ssm_cfg": {"d_state": 4, "headdim": 8}}, "ssm_cfg.headdim=8"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim": 8, "ngroups": 3}}, "ssm_cfg.ngroups=3"),
])
def test_settings_transformers_cannot_represent_are_refused_by_key(change, key):
    with pytest.raises(MambaSsmCheckpointError, match=key) as err:
        transformers_config({**MAMBA1, **change})
    assert "\n" not in str(err.value)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    folder, sd = write_native(tmp_path / "m", MAMBA1)
    del sd["backbone.layers.1.mixer.D"]
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(MambaSsmCheckpointError, match=r"lacks backbone\.layers\.1\.mixer\.D"):
        load_model_and_tokenizer(str(folder), dtype="float32")
    sd["backbone.layers.1.mixer.D"] = torch.ones(5)
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(MambaSsmCheckpointError, match=r"mixer\.D has shape \(5,\), its config.json implies \(32,\)"):
        load_model_and_tokenizer(str(folder), dtype="float32")
    torch.save({"state": sd, "where": Path("x")}, folder / "pytorch_model.bin")  # pickles a Python object
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_model_and_tokenizer(str(folder), dtype="float32")


def test_safetensors_weights_with_the_tied_head_stored_once(tmp_path):
    from safetensors.torch import save_file

    folder, sd = write_native(tmp_path / "m", MAMBA2)
    (folder / "pytorch_model.bin").unlink()
    save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}, folder / "model.safetensors")
    model, _ = load_model_and_tokenizer(str(folder), dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference_logits(sd, MAMBA2, IDS), rtol=1e-4, atol=1e-4)


def adapted(model, fmt):
    """Lily on in_proj and out_proj; for PEFT's format LoRA on in_proj (PEFT refuses Mamba's out_proj)."""
    config = (lily_ssm.LilyConfig(["in_proj", "out_proj"], r=4, num_A=1, num_B=2) if fmt == "lily"
              else lily_ssm.LoraConfig(["in_proj"], r=4, alpha=8))
    lily_ssm.apply_adapter(model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.lily_ssm_adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("fmt", ["lily", "peft"])
def test_an_adapter_saves_and_loads_against_the_native_folder(tmp_path, fmt):
    folder, _ = write_native(tmp_path / "native", MAMBA2)
    model, _ = load_model_and_tokenizer(str(folder), dtype="float32")
    with torch.no_grad():
        base = model(IDS).logits
    model = adapted(model, fmt).eval()
    with torch.no_grad():
        expected = model(IDS).logits
    assert not torch.allclose(expected, base, atol=1e-3)
    saved = lily_ssm.save_adapter(model, tmp_path / "adapter", format=fmt)
    if fmt == "peft":  # PEFT's own field for the base names the folder, which rebuilds it
        assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)
    again, _ = load_model_and_tokenizer(str(folder), dtype="float32")
    lily_ssm.load_adapter(again, saved)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(IDS).logits, expected, rtol=0, atol=0)


def test_a_run_on_a_native_folder_records_it_and_rebuilds_from_it(tmp_path):
    from lily_ssm.config.experiment import parse_config
    from lily_ssm.config.record import read_record
    from lily_ssm.data.prompts import training_prompt
    from lily_ssm.train.trainer import run_training

    rows = [{"instruction": f"Does the {a} sit on the {b}?", "input": "", "output": f"the answer is {a}",
             "answer": a} for a in WORDS[:6] for b in WORDS[6:9]]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    folder, _ = write_native(tmp_path / "native", MAMBA1, tokenizer=False)
    build_word_tokenizer([training_prompt(r["instruction"], r["input"], r["output"]) for r in rows]).save_pretrained(
        folder)
    out = tmp_path / "run"
    run_training(parse_config({
        "model": {"name_or_path": str(folder), "dtype": "float32"},
        "adapter": {"method": "lily", "targets": ["in_proj", "dt_proj"], "r": 4, "num_A": 1, "num_B": 2},
        "data": {"train_file": str(tmp_path / "train.json"), "cutoff_len": 64, "val_set_size": 0},
        "training": {"output_dir": str(out), "max_steps": 3, "batch_size": 6, "micro_batch_size": 6,
                     "learning_rate": 5e-2, "warmup_steps": 0, "save_steps": 100, "logging_steps": 1,
                     "progress_bar": False}}), log=lambda *_: None)
    record = read_record(out)
    assert record.base_model == str(folder)
    base, _ = load_model_and_tokenizer(record.base_model, record.section("model")["dtype"])
    rebuilt, _ = load_model_and_tokenizer(record.base_model, record.section("model")["dtype"])
    lily_ssm.load_adapter(rebuilt, out)
    with torch.no_grad():
        assert not torch.allclose(rebuilt.eval()(IDS).logits, base(IDS).logits, atol=1e-4)  # the trained adapter


def test_the_lily_lm_eval_backend_scores_a_native_folder(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from lily_ssm.evaluation.harness import LilyLM

    folder, sd = write_native(tmp_path / "native", MAMBA1)
    model, _ = load_model_and_tokenizer(str(folder), dtype="float32")
    adapter = lily_ssm.save_adapter(adapted(model, "lily").eval(), tmp_path / "adapter")
    with torch.no_grad():
        adapted_logits = model(IDS).logits

    lm = LilyLM(pretrained=str(folder), dtype="float32", batch_size=2, device="cpu")
    pairs = [("the cat sat", " on a mat"), ("a dog ran", " far away from home"), ("the dog", " sat")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for (context, continuation), (score, _) in zip(pairs, lm.loglikelihood(requests)):
        ctx, whole = lm.tok_encode(context), lm.tok_encode(context + continuation)  # as lm-eval splits them
        cont = whole[len(ctx):]
        ids = torch.tensor([whole])
        logprobs = reference_logits(sd, MAMBA1, ids[:, :-1]).log_softmax(-1)[0, len(ctx) - 1:]
        assert score == pytest.approx(float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
    with_adapter = LilyLM(pretrained=str(folder), adapter=str(adapter), dtype="float32", batch_size=2, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(with_adapter.model(IDS).logits, adapted_logits, rtol=0, atol=0)
    with pytest.raises(MambaSsmCheckpointError, match="peft='x' is not available with the mamba-ssm checkpoint"):
        LilyLM(pretrained=str(folder), peft="x", device="cpu")


# --- lm-eval's plugin entry point: `lm_eval --model lily` without the lily-ssm lm-eval wrapper

ROOT = Path(__file__).resolve().parents[1]


def lm_eval_entry_point() -> str:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"]["lm_eval.models"]["lily"]


def run_python(code: str, extra_path: Path | None = None):
    import os
    import subprocess
    import sys

    paths = [str(p) for p in (extra_path, ROOT) if p is not None]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_pyproject_registers_the_lily_backend_under_lm_evals_entry_point_group():
    pytest.importorskip("lm_eval")
    from importlib.metadata import EntryPoint

    from lm_eval.api.registry import get_model

    from lily_ssm.evaluation.harness import LilyLM

    value = lm_eval_entry_point()
    assert EntryPoint(name="lily", value=value, group="lm_eval.models").load() is LilyLM is get_model("lily")
    # lm-eval records a discovered plugin as a lazy "module:object" placeholder; the class's own @register_model
    # upgrades it only when the two name the same object where it is defined (a re-export would collide).
    assert value == f"{LilyLM.__module__}:{LilyLM.__qualname__}"


def test_lm_evals_lazy_placeholder_resolves_to_the_backend_in_a_fresh_process():
    pytest.importorskip("lm_eval")
    code = ("from lm_eval.api.registry import get_model, model_registry\n"
            f"model_registry.register('lily', target={lm_eval_entry_point()!r})\n"
            "cls = get_model('lily')\n"
            "print(cls.__module__ + ':' + cls.__qualname__)\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == lm_eval_entry_point()


def test_lm_eval_finds_lily_through_installed_entry_points(tmp_path):
    """A distribution whose metadata carries pyproject's entry point, on the path of a fresh process that never
    imports lily-ssm itself: lm-eval versions that read the group resolve `lily`; older ones are skipped."""
    lm_eval = pytest.importorskip("lm_eval")
    dist = tmp_path / "lily_ssm_entry_point_probe-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lily-ssm-entry-point-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[lm_eval.models]\nlily = {lm_eval_entry_point()}\n")
    code = ("from lm_eval.api.registry import get_model\n"
            "try:\n    cls = get_model('lily')\nexcept (KeyError, ValueError):\n    print('not found')\n"
            "else:\n    print(cls.__module__ + ':' + cls.__qualname__)\n")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    found = result.stdout.strip().splitlines()[-1]
    package = Path(lm_eval.__file__).parent
    reads_entry_points = any("entry_points(" in path.read_text() for folder in (".", "api", "models")
                             for path in (package / folder).glob("*.py"))
    if found == "not found" and not reads_entry_points:
        pytest.skip(f"lm-eval {lm_eval.__version__} does not read the lm_eval.models entry points (its main "
                    "branch adds that, lm-eval PR #4013); `lily-ssm lm-eval` registers the backend there")
    assert found == lm_eval_entry_point()
