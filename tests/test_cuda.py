"""GPU checks (``pytest -m cuda tests/test_cuda.py``, run by ``eval/gpu_check.sh``).

Tests marked ``needs_kernels`` compare the CUDA kernels (mamba-ssm, causal-conv1d) with lily-ssm's
PyTorch path, adapters active, values and gradients; they skip, naming what is missing, when the
kernels do not import. The others run lily-ssm's PyTorch path on CUDA tensors either way.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, MAMBA_TARGETS, randomise_adapter, tiny_family, tiny_mamba

import lily_ssm
from lily_ssm.modules.recompute import unfused
from lily_ssm.ops import conv as conv_ops
from lily_ssm.ops import kernels, selective_scan_chunked, ssd

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _need_cuda(request):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if "needs_kernels" in request.keywords:
        missing = [name for name in kernels.KERNELS if kernels.get(name) is None]
        if missing:
            pytest.skip(f"CUDA kernels not importable ({', '.join(missing)}): pip install 'lily-ssm[cuda]'")


needs_kernels = pytest.mark.needs_kernels


def _reference_only():
    """Inside this block no kernel is usable, so lily-ssm runs its PyTorch path on CUDA tensors too."""
    return kernels.override(devices=("cuda",))


def _kernel_step_matches_reference(model, reference, ids, atol=1e-4, rtol=1e-3, **kwargs) -> None:
    """One training step of ``model`` on the kernels and of its copy ``reference`` on the PyTorch path:
    equal losses, and every adapter gradient non-zero and equal."""
    loss_k = model(ids, labels=ids, **kwargs).loss
    loss_k.backward()
    with _reference_only():
        loss_r = reference(ids, labels=ids, **kwargs).loss
        loss_r.backward()
    torch.testing.assert_close(loss_k, loss_r, atol=1e-4, rtol=1e-4)
    for (name, pk), (_, pr) in zip(model.lily_ssm_adapter.named_parameters(),
                                   reference.lily_ssm_adapter.named_parameters()):
        assert pk.grad is not None and pk.grad.abs().sum() > 0, name
        torch.testing.assert_close(pk.grad, pr.grad, atol=atol, rtol=rtol, msg=name)


@needs_kernels
def test_scan_kernel_matches_chunked_scan_values_and_gradients():
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, n, length = 2, 64, 16, 300
    x = {
        "u": torch.randn(b, d, length, device="cuda", generator=g),
        "delta": torch.randn(b, d, length, device="cuda", generator=g) * 0.5,
        "A": -torch.rand(d, n, device="cuda", generator=g) * 4,
        "B": torch.randn(b, n, length, device="cuda", generator=g),
        "C": torch.randn(b, n, length, device="cuda", generator=g),
        "D": torch.randn(d, device="cuda", generator=g),
        "z": torch.randn(b, d, length, device="cuda", generator=g),
        "delta_bias": torch.randn(d, device="cuda", generator=g) * 0.5,
    }
    for v in x.values():
        v.requires_grad_()
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out_k, last_k = kernels.get("selective_scan_fn")(*args, True, True)
    out_r, last_r = selective_scan_chunked(*args, True, True)
    torch.testing.assert_close(out_k, out_r, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(last_k.float(), last_r, atol=1e-4, rtol=1e-3)
    grads_k = torch.autograd.grad(out_k.sum(), args)
    grads_r = torch.autograd.grad(out_r.sum(), args)
    for name, gk, gr in zip(x, grads_k, grads_r):
        torch.testing.assert_close(gk, gr, atol=1e-3, rtol=1e-3, msg=f"gradient of {name}")


@needs_kernels
def test_conv_kernels_match_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 64, 40, device="cuda", generator=g)
    weight, bias = torch.randn(64, 4, device="cuda", generator=g), torch.randn(64, device="cuda", generator=g)
    torch.testing.assert_close(conv_ops.causal_conv1d(x, weight, bias, "silu"),
                               conv_ops.causal_conv1d_ref(x, weight, bias, "silu"), atol=1e-5, rtol=1e-5)
    state_k, state_r = torch.zeros(2, 64, 4, device="cuda"), torch.zeros(2, 64, 4, device="cuda")
    for t in range(6):
        step = x[..., t]
        torch.testing.assert_close(conv_ops.causal_conv1d_update(step, state_k, weight, bias, "silu"),
                                   conv_ops.causal_conv1d_update_ref(step, state_r, weight, bias, "silu"),
                                   atol=1e-5, rtol=1e-5)
    for state_len in (3, 6):  # several tokens at once, and states of other lengths than the width
        state_k = torch.randn(2, 64, state_len, device="cuda", generator=g)
        state_r = state_k.clone()
        chunk = x[..., 6:9]
        torch.testing.assert_close(conv_ops.causal_conv1d_update(chunk, state_k, weight, bias, "silu"),
                                   conv_ops.causal_conv1d_update_ref(chunk, state_r, weight, bias, "silu"),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state_k, state_r)


@needs_kernels
@pytest.mark.parametrize("kind", ["falcon", "mamba"])
def test_adapted_model_on_kernels_matches_pytorch_path(kind):
    model = lily_ssm.apply_adapter(tiny_mamba(kind), lily_ssm.LilyConfig(list(MAMBA_TARGETS), r=4, num_A=2, num_B=3))
    randomise_adapter(model)
    model = model.cuda().train()
    reference = copy.deepcopy(model)
    ids = torch.randint(2, 64, (2, 24), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    _kernel_step_matches_reference(model, reference, ids, attention_mask=mask)


@needs_kernels
@pytest.mark.parametrize("routing", ["sequence", "causal", "token"])
def test_cached_generation_on_kernels_matches_pytorch_path(routing):
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"),
                                   lily_ssm.LilyConfig(list(MAMBA_TARGETS), r=4, num_A=2, num_B=3, routing=routing))
    randomise_adapter(model, std=0.5)
    model = model.cuda().eval()
    ids = torch.randint(2, 64, (2, 9), device="cuda")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        on_kernels = model.generate(ids, use_cache=True, **kwargs)
        with _reference_only():
            on_reference = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(on_kernels, on_reference)


@needs_kernels
def test_ssd_kernel_matches_chunked_scan_values_and_gradients():
    """mamba_chunk_scan_combined and lily-ssm's chunked SSD scan, each against the sequential recurrence in fp64:
    outputs, final states and every gradient. The kernel's error is reported beside ours, so a failure says
    whether the two compute different functions or only round differently."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, length, h, p, groups, n, chunk = 2, 300, 8, 8, 2, 8, 8  # the families' SSD shape: Triton compiles once
    x = {
        "x": torch.randn(b, length, h, p, device="cuda", generator=g),
        "dt": torch.randn(b, length, h, device="cuda", generator=g) * 0.5,
        "A": -torch.rand(h, device="cuda", generator=g) * 4 - 0.5,
        "B": torch.randn(b, length, groups, n, device="cuda", generator=g),
        "C": torch.randn(b, length, groups, n, device="cuda", generator=g),
        "D": torch.randn(h, device="cuda", generator=g),
        "z": torch.randn(b, length, h, p, device="cuda", generator=g),
        "dt_bias": torch.randn(h, device="cuda", generator=g) * 0.5,
    }
    weights = torch.randn(b, length, h, p, device="cuda", generator=g)  # a loss that weighs every output
    results = {}
    scans = (("kernel", kernels.get("mamba_chunk_scan_combined"), torch.float32),
             ("chunked", ssd.ssd_chunk_scan, torch.float32), ("exact", ssd.ssd_scan_ref, torch.float64))
    for name, scan, dtype in scans:
        inputs = {k: v.to(dtype).detach().requires_grad_() for k, v in x.items()}
        y, last = scan(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk, D=inputs["D"],
                       z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=True, return_final_states=True)
        grads = torch.autograd.grad((y.double() * weights.double()).sum(), list(inputs.values()))
        results[name] = {"y": y.double(), "last": last.double(), **{f"d{k}": gr.double() for k, gr in zip(x, grads)}}

    def relative(name: str, key: str) -> float:
        exact = results["exact"][key]
        return float((results[name][key] - exact).abs().max() / exact.abs().max())

    errors = {key: (relative("kernel", key), relative("chunked", key)) for key in results["exact"]}
    report = "; ".join(f"{key}: kernel {k:.1e}, chunked {c:.1e}" for key, (k, c) in errors.items())
    assert all(c < 1e-4 for _, c in errors.values()), f"lily-ssm's chunked scan is off the recurrence: {report}"
    assert all(k < 1e-2 for k, _ in errors.values()), f"the kernel is off the recurrence: {report}"
    print(f"relative max errors against the fp64 recurrence: {report}")


def _family_targets(kind: str) -> list[str]:
    return ["in_proj", "x_proj", "dt_proj", "out_proj"] if kind == "jamba" else ["in_proj.x", "in_proj.dt", "out_proj"]


@needs_kernels
@pytest.mark.parametrize("kind", FAMILIES)
def test_families_on_kernels_match_pytorch_path(kind):
    """Each family's owned mixer on the kernels (out_proj a module): the loss, every adapter gradient and
    cached generation of the PyTorch path."""
    model = lily_ssm.apply_adapter(tiny_family(kind), lily_ssm.LilyConfig(_family_targets(kind), r=4, num_A=1,
                                                                          num_B=3))
    randomise_adapter(model, std=0.3)
    model = model.cuda().train()
    reference = copy.deepcopy(model)
    ids = torch.randint(2, 64, (2, 24), device="cuda")
    _kernel_step_matches_reference(model, reference, ids, atol=1e-3, rtol=1e-2)
    model.eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        on_kernels = model.generate(ids[:, :9], **kwargs)
        with _reference_only():
            on_reference = model.generate(ids[:, :9], use_cache=False, **kwargs)
    assert torch.equal(on_kernels, on_reference)


@pytest.mark.parametrize("kind", ["jamba", "mamba2", "falcon_h1"])
def test_family_pytorch_path_on_cuda_matches_cpu(kind):
    model = lily_ssm.apply_adapter(tiny_family(kind), lily_ssm.LilyConfig(_family_targets(kind), r=4, num_A=1,
                                                                          num_B=3))
    randomise_adapter(model, std=0.3)
    on_gpu = copy.deepcopy(model).cuda().train()
    model.train()
    ids = torch.randint(2, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_cpu = model(ids, labels=ids).loss
    loss_cpu.backward()
    with _reference_only():
        loss_gpu = on_gpu(ids.cuda(), labels=ids.cuda()).loss
        loss_gpu.backward()
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, atol=1e-4, rtol=1e-4)
    for (name, p), (_, q) in zip(model.lily_ssm_adapter.named_parameters(), on_gpu.lily_ssm_adapter.named_parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_pytorch_path_on_cuda_matches_cpu():
    """lily-ssm's own scan and convolution on CUDA tensors: the loss and adapter gradients of the CPU run."""
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily_ssm.LilyConfig(list(MAMBA_TARGETS), r=4, num_A=2,
                                                                             num_B=3))
    randomise_adapter(model)
    on_gpu = copy.deepcopy(model).cuda().train()
    model.train()
    ids = torch.randint(2, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    loss_cpu = model(ids, attention_mask=mask, labels=ids).loss
    loss_cpu.backward()
    with _reference_only():
        loss_gpu = on_gpu(ids.cuda(), attention_mask=mask.cuda(), labels=ids.cuda()).loss
        loss_gpu.backward()
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, atol=1e-4, rtol=1e-4)
    for (name, p), (_, q) in zip(model.lily_ssm_adapter.named_parameters(), on_gpu.lily_ssm_adapter.named_parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_fused_core_on_cuda_equals_unfused_and_saves_no_more_than_mamba_inner_fn():
    """The paper's 7B mixer shape in bf16 on the GPU (kernels when importable): fused == unfused, and the
    fused mixer keeps no more per token for backward than mamba_inner_fn with the same in_proj adapter."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    from lily_ssm.analysis.memory import saved_bytes
    from lily_ssm.ops.standins import mamba_inner_standin

    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=128, hidden_size=4096, intermediate_size=8192, num_hidden_layers=1,
                               state_size=16, time_step_rank=256, conv_kernel=4)
    model = FalconMambaForCausalLM(config).to("cuda", torch.bfloat16)
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj", "dt_proj"], r=40, num_A=1, num_B=4,
                                                      routing="causal", overrides={"dt_proj": {"r": 8}}))
    randomise_adapter(model, std=0.02)
    model.train()
    mixer = model.backbone.layers[0].mixer
    hidden = torch.randn(4, 256, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kib = saved_bytes(lambda: mixer(hidden), exclude=list(model.parameters())) / (4 * 256 * 1024)
    peer = saved_bytes(lambda: mamba_inner_standin(mixer.in_proj(hidden).transpose(1, 2), mixer),
                       exclude=list(model.parameters())) / (4 * 256 * 1024)
    assert kib <= peer, (kib, peer)
    outputs, grads = [], []
    for context in (torch.enable_grad, unfused):
        with context():
            hidden.grad = None
            for p in model.lily_ssm_adapter.parameters():
                p.grad = None
            out = mixer(hidden)
            out.float().square().mean().backward()
            outputs.append(out.detach())
            grads.append([hidden.grad.clone()] + [p.grad.clone() for p in model.lily_ssm_adapter.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1])
    for fused, plain in zip(*grads):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-3)


@needs_kernels
@pytest.mark.parametrize("kind", ["falcon", "mamba", *FAMILIES])
def test_the_training_forward_is_the_evaluated_forward(kind):
    """On the kernels, train mode with gradients (the fused core) computes the same logits as eval mode (stock
    Falcon-Mamba's fused training path normalises Δ after dt_proj, its evaluation before: two functions)."""
    base = tiny_mamba(kind) if kind in ("falcon", "mamba") else tiny_family(kind)
    targets = list(MAMBA_TARGETS) if kind in ("falcon", "mamba") else _family_targets(kind)
    model = lily_ssm.apply_adapter(base, lily_ssm.LilyConfig(targets, r=4, num_A=1, num_B=3))
    randomise_adapter(model, std=0.3)
    model = model.cuda()
    ids = torch.randint(2, 64, (2, 24), device="cuda")
    model.train()
    trained = model(ids).logits
    model.eval()
    with torch.no_grad():
        evaluated = model(ids).logits
    torch.testing.assert_close(trained.detach(), evaluated, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_graphed_decoding_equals_eager_decoding_and_generate():
    """greedy_decode with its decode step in a CUDA graph: the tokens of the eager steps and of generate."""
    from lily_ssm.evaluation.decoding import greedy_decode

    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily_ssm.LilyConfig(list(MAMBA_TARGETS), r=4, num_A=2,
                                                                             num_B=3, routing="causal"))
    randomise_adapter(model, std=0.5)
    model = model.cuda().eval()
    ids = torch.randint(2, 64, (3, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    graphed = greedy_decode(model, ids, 12, attention_mask=mask, graph=True)
    eager = greedy_decode(model, ids, 12, attention_mask=mask, graph=False)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    assert torch.equal(graphed, eager) and torch.equal(eager, generated)
