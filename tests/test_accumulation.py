"""Exact contrastive gradient accumulation (GradCache) and the losses, on real models and data."""

import pytest
import torch
from accelerate import Accelerator
from open_clip.loss import SigLipLoss

from clipa.data.loader import TrainStream
from clipa.data.synthetic import SyntheticSource
from clipa.data.transforms import normalize, train_transform
from clipa.loss import LOSSES, infonce_loss, siglip_loss
from clipa.model import Geometry, build_tokenizer, create_model, stage_config
from clipa.reduction import TextReducer, install_patch_masker
from clipa.step import ContrastiveStep

GEOMETRY = Geometry(32, 8)


def global_batch(n=64, masked=False):
    reducer = TextReducer(build_tokenizer("clipa-tiny", 8), "truncate", 8)
    stream = TrainStream(SyntheticSource(seed=0), train_transform(32, (0.6, 1.0)), reducer, micro_batch=n,
                         mask=("random", (4, 4), 0.5) if masked else None)
    images, texts, keep = stream.batch(0)
    return normalize(images), texts, keep


def split(batch, micro):
    images, texts, keep = batch
    return [(images[i:i + micro], texts[i:i + micro], None if keep is None else keep[i:i + micro])
            for i in range(0, images.shape[0], micro)]


def gradients(micro_batches, loss_kind="infonce", masked=False):
    torch.manual_seed(0)
    model = create_model(stage_config("clipa-tiny", GEOMETRY, loss_kind))
    masker = install_patch_masker(model, "random", 0.5) if masked else None
    model.train()
    step = ContrastiveStep(model, model, LOSSES[loss_kind], Accelerator(cpu=True), masker)
    loss = step(micro_batches)
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(a, b, rtol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("loss_kind, masked", [("infonce", False), ("infonce", True), ("siglip", False)])
def test_accumulated_step_equals_one_big_step(loss_kind, masked):
    batch = global_batch(masked=masked)
    loss_big, big = gradients(split(batch, 64), loss_kind, masked)
    loss_acc, acc = gradients(split(batch, 16), loss_kind, masked)
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    assert "logit_scale" in big and (loss_kind != "siglip" or "logit_bias" in big)
    assert_same_gradients(acc, big)


def test_naive_accumulation_is_a_different_loss():
    """Averaging per-micro-batch losses (fewer negatives) gives other gradients: the check above can fail."""
    batch = global_batch()
    _, big = gradients(split(batch, 64))
    torch.manual_seed(0)
    model = create_model(stage_config("clipa-tiny", GEOMETRY))
    for images, texts, _ in split(batch, 16):
        out = model(images, texts)
        (infonce_loss(out["image_features"], out["text_features"], out["logit_scale"]) / 4).backward()
    naive = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    err = (naive["visual.proj"] - big["visual.proj"]).norm() / big["visual.proj"].norm()
    assert err > 1e-2


def test_siglip_matches_open_clip_reference():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(12, 16), dim=-1).requires_grad_()
    texts = torch.nn.functional.normalize(torch.randn(12, 16), dim=-1).requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    ours = siglip_loss(images, texts, scale, bias)
    ours_grads = torch.autograd.grad(ours, [images, texts, scale, bias])
    reference = SigLipLoss()(images, texts, scale, bias)
    ref_grads = torch.autograd.grad(reference, [images, texts, scale, bias])
    torch.testing.assert_close(ours, reference)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_infonce_matches_a_direct_computation():
    torch.manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    logits = 20.0 * images @ texts.T
    expected = sum(-(logits[i, i] - logits[i].logsumexp(0)) - (logits[i, i] - logits[:, i].logsumexp(0))
                   for i in range(10)) / 20
    torch.testing.assert_close(infonce_loss(images, texts, torch.tensor(20.0)), expected)


@pytest.mark.parametrize("loss_fn", [infonce_loss, siglip_loss])
def test_chunked_loss_equals_unchunked(monkeypatch, loss_fn):
    import clipa.loss

    torch.manual_seed(2)
    images = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1).requires_grad_()
    texts = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1).requires_grad_()
    scale, bias = torch.tensor(12.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    whole = loss_fn(images, texts, scale, bias)
    whole_grads = torch.autograd.grad(whole, [images, texts, scale, bias], allow_unused=True)
    monkeypatch.setattr(clipa.loss, "CHUNK_ROWS", 7)  # 40 rows in 6 uneven chunks
    chunked = loss_fn(images, texts, scale, bias)
    chunked_grads = torch.autograd.grad(chunked, [images, texts, scale, bias], allow_unused=True)
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(chunked_grads, whole_grads):
        if b is not None:
            torch.testing.assert_close(a, b)


def test_bf16_autocast_step_matches_fp32_closely():
    batch = split(global_batch(32), 32)
    loss32, grads32 = gradients(batch)
    from accelerate.state import AcceleratorState

    torch.manual_seed(0)
    model = create_model(stage_config("clipa-tiny", GEOMETRY))
    model.train()
    AcceleratorState._reset_state(reset_partial_state=True)  # the precision is process-wide in accelerate
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        loss16 = ContrastiveStep(model, model, infonce_loss, accelerator)(batch).item()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32  # master weights stay fp32
        if p.grad is not None and grads32[name].norm() > 0:
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), grads32[name].flatten(), dim=0)
            assert cos > 0.95, (name, cos.item())
