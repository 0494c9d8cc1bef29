"""Lily on transformers' ViT for VTAB-1K (the paper's ViT-B/16 comparison): Lily on key / value and the adapter
parallel to each whole MLP block, checked against an independent port of the published forward
(visual-adaptation-benchmark/vit/lily.py), then through the VTAB runner, the ablation runner and inspect."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_adapter, tiny_llama
from torch import nn

import lily_ssm
from lily_ssm.config.vtab import VtabModelSection, load_vtab_config
from lily_ssm.data.vtab import write_fake_vtab
from lily_ssm.train.vtab import run_vtab_task
from lily_ssm.tuners import get_adapter_state
from lily_ssm.utils.compat import reads_legacy_vit_checkpoints
from lily_ssm.utils.sections import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vit"
TINY = CONFIGS / "tiny.yaml"
TARGETS = ["k_proj", "v_proj", "mlp"]


def tiny_vit(layers: int = 4, seed: int = 0, classes: int = 3) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                       intermediate_size=64, num_labels=classes)
    return ViTForImageClassification(config).eval()


def pixels(n: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def paper_config(**changes) -> lily_ssm.LilyConfig:
    """The published placement and routing at tiny sizes: ne = num_A = num_B, rank r on k / v, 2r on the MLP."""
    values = dict(r=4, num_A=2, num_B=2, scaling=0.7, routing="batch", overrides={"mlp": {"r": 8}},
                  modules_to_save=["classifier"])
    return lily_ssm.LilyConfig(TARGETS, **{**values, **changes})


# ----------------------------------------------------------------------------------------------
# The published forward, ported independently (timm Attention / Mlp patched with lily_adapter)


class PublishedLily(nn.Module):
    """``lily_adapter`` of vit/lily.py: hidden = act(lp(x)); the router softmax averaged over batch and tokens
    mixes the shared ``hps``; out = hidden @ mixed. ``lp`` is an ``nn.Linear`` weight ``(r, in)``."""

    def __init__(self, lp: torch.Tensor, hps: torch.Tensor, router: torch.Tensor, mlp: bool) -> None:
        super().__init__()
        self.lp, self.hps, self.router, self.mlp = lp, hps, router, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x @ self.lp.T
        if self.mlp:
            hidden = torch.relu(hidden)
        probability = F.softmax(hidden @ self.router.T, dim=-1).mean(dim=(0, 1))
        return hidden @ torch.einsum("e,eio->io", probability, self.hps)


def published_model(base: nn.Module, tensors: dict[str, torch.Tensor], s: float, ne: int) -> nn.Module:
    """``base`` with set_lily_kv's adapters: layer i uses the down projection made at layer ``stride·(i //
    stride)`` (``stride = L // ne``), its own router, and the type's shared experts; k and v get ``s·lily(x)``,
    the MLP block ``s·lily_mlp(x)`` added to its output."""
    model = copy.deepcopy(base)
    layers = model.vit.layers
    stride = len(layers) // ne
    for i, layer in enumerate(layers):
        for name, module, is_mlp in (("k_proj", layer.attention.k_proj, False),
                                     ("v_proj", layer.attention.v_proj, False), ("mlp", layer.mlp, True)):
            lp = tensors[f"{name}.A"][i // stride].T  # our (in, r) A is nn.Linear(in, r).weight.T
            lily = PublishedLily(lp, tensors[f"{name}.B"], tensors[f"{name}.router"][i], is_mlp)
            module.register_forward_hook(lambda _m, args, out, lily=lily: out + lily(args[0]) * s)
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_adapter_state(model).tensors().items()}


def test_lily_on_kv_and_beside_the_mlp_matches_the_published_forward():
    base = tiny_vit()
    model = lily_ssm.apply_adapter(tiny_vit(), paper_config())
    randomise_adapter(model)
    reference = published_model(base, adapter_tensors(model), s=0.7, ne=2)
    x = pixels()
    with torch.no_grad():
        ours, theirs, plain = model(x).logits, reference(x).logits, base(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the adapters do change the output
    state = get_adapter_state(model)
    assert {k: g.activation for k, g in state.groups.items()} == {"k_proj": None, "v_proj": None, "mlp": "relu"}


def test_the_mlp_adapter_on_literal_values():
    """One token through the MLP adapter's pool: relu(x A) = relu([1, -3]) = [1, 0]; router logits [1, 0] give
    softmax [σ(1), σ(-1)]; row 0 of σ(1)·B0 + σ(-1)·B1 is [tanh(1/2), 2σ(1)]; scaled by s = 2."""
    model = lily_ssm.apply_adapter(tiny_vit(layers=1), lily_ssm.LilyConfig(["mlp"], r=2, num_A=1, num_B=2, scaling=2.0,
                                                                         routing="batch"))
    pool = get_adapter_state(model).pools["mlp"]
    slot = pool.group.modules[0]
    with torch.no_grad():
        pool.A.zero_()
        pool.A[0, :2] = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
        pool.router.zero_()
        pool.router[0, 0, 0] = 1.0
        pool.B.zero_()
        pool.B[0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        pool.B[1, :2, :2] = torch.tensor([[-1.0, 0.0], [5.0, 5.0]])
        x = torch.zeros(1, 1, 32)
        x[0, 0, :2] = torch.tensor([1.0, -1.0])
        out = pool.delta(x, slot)[0, 0, :2]
    sigma = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(out, 2.0 * torch.tensor([math.tanh(0.5), 2 * sigma]))


def test_zero_init_is_the_base_and_every_adapter_tensor_trains():
    x, labels = pixels(), torch.tensor([0, 1, 2])
    base = tiny_vit()
    model = lily_ssm.apply_adapter(tiny_vit(), paper_config())
    model.train()
    assert torch.equal(model(x).logits, base.train()(x).logits)  # B starts at zero
    F.cross_entropy(model(x).logits, labels).backward()
    tensors = get_adapter_state(model).tensors()
    assert all(tensors[f"{k}.B"].grad.abs().sum() > 0 for k in TARGETS)
    model.zero_grad()
    randomise_adapter(model)
    F.cross_entropy(model(x).logits, labels).backward()
    no_grad = [k for k, p in tensors.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith(("lily_ssm", "classifier")))


def test_save_and_load_give_identical_logits(tmp_path):
    model = lily_ssm.apply_adapter(tiny_vit(), paper_config())
    randomise_adapter(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    folder = lily_ssm.save_adapter(model, tmp_path / "adapter")
    loaded = lily_ssm.load_adapter(tiny_vit(), folder)
    x = pixels()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["modules"]["vit.layers.3.mlp"] == [32, 32] and "mlp.router" in meta["tensors"]


def test_a_bypassed_mlp_is_caught_by_the_liveness_check():
    from lily_ssm.tuners.liveness import DeadAdapterError

    model = lily_ssm.apply_adapter(tiny_vit(), paper_config())
    layer = model.vit.layers[2]

    def without_calling_mlp(hidden_states, *args, **kwargs):  # as a fused path would: fc1 / fc2 directly
        hidden_states = layer.attention(layer.layernorm_before(hidden_states))[0] + hidden_states
        mlp = layer.mlp
        return hidden_states + mlp.fc2(mlp.activation_fn(mlp.fc1(layer.layernorm_after(hidden_states))))

    layer.forward = without_calling_mlp
    with pytest.raises(DeadAdapterError, match=r"adapters on vit\.layers\.2\.mlp did not run"):
        model(pixels())


def test_where_the_mlp_adapter_does_not_apply_it_is_refused_in_one_line():
    from lily_ssm.models.vim import VimConfig, VisionMamba

    vim = VisionMamba(VimConfig(img_size=16, patch_size=8, embed_dim=16, depth=2, num_classes=3))
    cases = [(vim, "target 'mlp' matches no module of VisionMamba.*blocks: ViTMLP"),
             (tiny_llama(layers=2), "is a LlamaMLP, but adapters go into nn.Linear layers or run parallel to a whole "
                                    "ViTMLP")]
    for model, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["mlp"], r=2, num_A=1, num_B=2))
        assert "\n" not in str(caught.value)
    lora = lily_ssm.apply_adapter(tiny_vit(), lily_ssm.LoraConfig(["v_proj", "mlp"], r=2, alpha=4.0))
    with pytest.raises(ValueError, match="the adapter on mlp runs parallel to a whole block"):
        lily_ssm.merge_adapter(lora)


def test_the_mlp_adapter_is_not_exported_to_peft(tmp_path):
    lora = lily_ssm.apply_adapter(tiny_vit(), lily_ssm.LoraConfig(["v_proj", "mlp"], r=2, alpha=4.0))
    with pytest.raises(ValueError, match="mlp: the adapter runs parallel to a whole block with a relu between A and "
                                         "B; PEFT adapts single layers"):
        lily_ssm.save_adapter(lora, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


# ----------------------------------------------------------------------------------------------
# The VTAB model section: kinds, checkpoints, image settings


def test_unknown_kinds_and_presets_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"^model.kind='deit'; kinds: vim, vit$"):
        VtabModelSection(kind="deit").check()
    with pytest.raises(ConfigError, match="model.preset='vim_small' for kind vit; presets: vit_base_patch16_224, "):
        load_vtab_config(TINY, ["model.preset=vim_small"])
    assert VtabModelSection().record() == {"preset": "vim_small", "checkpoint": None, "img_size": 224, "overrides": {}}


def old_layout_checkpoint(folder: Path, preprocessor: dict | None) -> dict[str, torch.Tensor]:
    """A tiny ViTModel saved as the hub's ViT checkpoints are (transformers 4 names, with a pooler)."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(3)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, architectures=["ViTModel"])
    state = ViTModel(config).state_dict()
    renames = [("layers.", "encoder.layer."), ("attention.q_proj", "attention.attention.query"),
               ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
               ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
               ("mlp.fc2", "output.dense")]
    old = {}
    for key, value in state.items():
        for a, b in renames:
            key = key.replace(a, b)
        old[key] = value.clone()
    folder.mkdir(parents=True)
    save_file(old, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return state


def test_a_checkpoint_gives_the_weights_image_size_and_normalisation(tmp_path):
    folder = tmp_path / "vit-in21k"
    state = old_layout_checkpoint(folder, {"do_normalize": True, "image_mean": [0.4, 0.5, 0.6],
                                           "image_std": [0.2, 0.3, 0.4]})
    section = VtabModelSection(kind="vit", checkpoint=str(folder))
    if not reads_legacy_vit_checkpoints():
        with pytest.raises(ValueError, match="uses the hub's ViT key layout .* transformers 5.18 and later convert it"):
            section.backbone("dtd")
        return
    model = section.backbone("dtd")
    assert torch.equal(model.vit.layers[1].attention.k_proj.weight, state["layers.1.attention.k_proj.weight"])
    assert torch.equal(model.vit.layers[1].mlp.fc2.weight, state["layers.1.mlp.fc2.weight"])
    assert model.classifier.out_features == 47 and model.config.num_labels == 47
    settings = section.image_settings(model)
    assert (settings.size, settings.mean, settings.std) == (32, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    (folder / "preprocessor_config.json").unlink()
    settings = section.image_settings(model)  # transformers' ViTImageProcessor defaults
    assert (settings.mean, settings.std) == ((0.5,) * 3, (0.5,) * 3) and "no preprocessor_config" in settings.source
    chosen = VtabModelSection(kind="vit", checkpoint=str(folder), mean=[0, 0, 0], std=[1, 1, 1])
    assert chosen.image_settings(model).std == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="model.img_size=64, but .* is a ViT for 32 px images"):
        VtabModelSection(kind="vit", checkpoint=str(folder), img_size=64).backbone("dtd")
    tiny_llama(layers=1).config.save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="holds a 'llama' model; model.kind: vit takes transformers ViT checkpoints"):
        VtabModelSection(kind="vit", checkpoint=str(tmp_path / "llama")).backbone("dtd")


def test_the_paper_config_counts_the_published_parameters():
    """vit/lily.py's set_lily_kv on ViT-B/16 (12 layers, width 768) with dim 16 and ne 4: per target type ne
    down projections, ne shared experts and a router per layer; the MLP adapter has rank 2·dim."""
    with torch.device("meta"):
        model = load_vtab_config(CONFIGS / "lily.yaml").build_model("cifar")
    layers, width, dim, ne = 12, 768, 16, 4
    kv = 2 * (ne * width * dim + ne * dim * width + layers * ne * dim)
    mlp = ne * width * 2 * dim + ne * 2 * dim * width + layers * ne * 2 * dim
    assert lily_ssm.parameter_report(model).adapter_total == kv + mlp == 396_288


# ----------------------------------------------------------------------------------------------
# The VTAB runner, the ablation runner and inspect on a tiny ViT


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit-vtab")
    write_fake_vtab(root / "data", "eurosat", classes=3, per_class=8, image_size=32, per_class_test=4)
    experiment = load_vtab_config(TINY, [f"data.root={root / 'data'}", f"training.output_dir={root / 'runs'}",
                                         "training.epochs=8", "training.eval_every=4"])
    messages: list[str] = []
    result = run_vtab_task(experiment, "eurosat", log=messages.append)
    return {"root": root, "result": result, "messages": messages}


def test_the_vtab_runner_trains_a_tiny_vit(trained):
    result, messages = trained["result"], trained["messages"]
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["head_parameters"] == 32 * 10 + 10  # eurosat has 10 classes; the classifier trains
    assert result["config"]["model"]["kind"] == "vit"
    assert result["config"]["adapter"]["modules_to_save"] == ["classifier"]
    assert any("32 px images, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5) (ViTImageProcessor defaults)" in m
               for m in messages)
    assert (trained["root"] / "runs" / "eurosat" / "adapter_model.safetensors").is_file()


def test_inspect_rebuilds_the_vit_of_a_task_folder(trained, tmp_path):
    from lily_ssm.analysis.inspect import inspect_adapters

    folder = trained["root"] / "runs" / "eurosat"
    summary = inspect_adapters([folder], tmp_path / "out", data=str(trained["root"] / "data"), limit=5, batch_size=3,
                               log=lambda *_: None)
    assert {Path(f).name for f in summary["figures"]} == {"effective_rank.png", "router_weights.png", "structure.png"}
    targets = summary["adapters"]["eurosat"]["targets"]
    assert set(targets) == set(TARGETS) and targets["mlp"]["r"] == 8 and summary["adapters"]["eurosat"]["samples"] == 5
    assert [row["a_group"] for row in targets["mlp"]["layers"]] == [0, 0, 1, 1]


def test_the_ablation_runner_plans_and_runs_vit_arms(trained, tmp_path):
    from lily_ssm.ablation import parse_ablation, plan_arms, run_ablation

    raw = {
        "ablation": {"path": "vim", "output_dir": str(tmp_path / "abl"), "budget": 1632, "methods": ["lily"],
                     "target_sets": ["kv+mlp"], "lily": {"num_A": 2, "num_B": 2}, "tasks": ["eurosat"]},
        "model": {"kind": "vit", "preset": "vit_tiny_test"},
        "data": {"root": str(trained["root"] / "data"), "batch_size": 8},
        "training": {"epochs": 1, "warmup_epochs": 0, "eval_every": 1, "learning_rate": 1e-2},
    }
    rows = run_ablation(parse_ablation(raw), log=lambda *_: None)["rows"]
    assert [(r["arm"], r["r"], r["parameters"], r["status"]) for r in rows] == [("lily-kv+mlp-batch", 4, 1632,
                                                                                  "finished")]
    assert "acc_eurosat" in rows[0]
    # the paper's App. E placements, Lily and LoRA (LoRA beside the MLP too), planned on the tiny ViT
    arms = plan_arms(parse_ablation({**raw, "ablation": {**raw["ablation"], "target_sets": None, "budget": 6144,
                                                         "methods": ["lily", "lora"], "tolerance": 0.2}}))
    assert [a.name for a in arms] == ["lily-qv-batch", "lora-qv", "lily-mlp-batch", "lora-mlp", "lily-qv+mlp-batch",
                                      "lora-qv+mlp", "lily-kv+mlp-batch", "lora-kv+mlp"]


def test_the_shipped_vit_ablation_plans_every_arm_within_five_percent():
    from lily_ssm.ablation import load_ablation, plan_arms

    arms = plan_arms(load_ablation(CONFIGS.parent / "ablation" / "vit_b.yaml"))  # planned on a meta-device ViT-B/16
    assert len(arms) == 8 and all(abs(a.deviation) <= 0.05 for a in arms)
    assert {a.adapter["num_A"] for a in arms if a.method == "lily"} == {12}
