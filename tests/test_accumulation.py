"""Exact contrastive gradient accumulation (GradCache) and the losses, on real models and data."""

import pytest
import torch
from accelerate import Accelerator
from open_clip.loss import SigLipLoss

from clipa.data.loader import TrainStream
from clipa.data.synthetic import SyntheticSource
from clipa.data.transforms import normalize, train_transform
from clipa.model.build import Geometry, build_tokenizer, create_model, stage_config
from clipa.model.masking import install_patch_masker
from clipa.reduction.text import TextReducer
from clipa.train.loss import LOSSES, infonce_loss, siglip_loss
from clipa.train.step import ContrastiveStep

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
    import clipa.train.loss

    torch.manual_seed(2)
    images = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1).requires_grad_()
    texts = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1).requires_grad_()
    scale, bias = torch.tensor(12.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    whole = loss_fn(images, texts, scale, bias)
    whole_grads = torch.autograd.grad(whole, [images, texts, scale, bias], allow_unused=True)
    monkeypatch.setattr(clipa.train.loss, "CHUNK_ROWS", 7)  # 40 rows in 6 uneven chunks
    chunked = loss_fn(images, texts, scale, bias)
    chunked_grads = torch.autograd.grad(chunked, [images, texts, scale, bias], allow_unused=True)
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(chunked_grads, whole_grads):
        if b is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.slow
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


# --------------------------------------------------------------------------- bad batch layouts at `clipa validate`

def validate_cli(*overrides, world_size=None):
    """`clipa validate tiny/pretrain ...` in this process, optionally as if under a launcher's WORLD_SIZE."""
    from typer.testing import CliRunner

    from clipa.cli.app import app

    env = {"COLUMNS": "200", "WORLD_SIZE": world_size}  # None unsets it
    result = CliRunner().invoke(app, ["validate", "tiny/pretrain", *overrides], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.mark.parametrize("overrides, world_size, message", [
    (["train.global_batch_size=100", "train.micro_batch_size=16"], None,
     "error: train.global_batch_size: 100 is not divisible by train.micro_batch_size (16) x 1 process; use "
     "train.micro_batch_size = 10 or 20 (divides the 100 samples per process) or train.global_batch_size = 96 or 112"),
    (["train.global_batch_size=4096", "train.micro_batch_size=48"], "16",
     "error: train.global_batch_size: 4096 is not divisible by train.micro_batch_size (48) x 16 processes; use "
     "train.micro_batch_size = 32 or 64 (divides the 256 samples per process) or train.global_batch_size = 3840 or 4608"),
    (["train.global_batch_size=100"], "16",
     "error: train.global_batch_size: 100 is not divisible by the 16 processes; use 96 or 112"),
    (["train.global_batch_size=64", "train.micro_batch_size=1"], None,
     "error: train.micro_batch_size: 1 with loss.kind = \"infonce\" is not supported; use train.micro_batch_size = 2 "
     "(or more, dividing 64) or loss.kind = \"siglip\""),
    (["loss.kind=infonse"], None,
     "error: loss.kind: unknown value \"infonse\"; did you mean \"infonce\"? (allowed: infonce, siglip)"),
])
def test_validate_rejects_bad_batch_layouts_with_a_fix(overrides, world_size, message):
    result = validate_cli(*overrides, world_size=world_size)
    assert result.exit_code == 2, result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == message  # one line: the key, the value, valid choices


def test_validate_accepts_and_reports_a_good_layout():
    result = validate_cli("train.global_batch_size=4096", "train.micro_batch_size=64", world_size="16")
    assert result.exit_code == 0, result.stderr
    assert "batch 4096 = 64 micro x 4 accumulation x 16 process(es)" in result.stdout
    # SigLIP's pairs are independent, so a micro-batch of 1 is fine there.
    assert validate_cli("train.global_batch_size=64", "train.micro_batch_size=1", "loss.kind=siglip").exit_code == 0


# --------------------------------------------------------------------------- replay, checkpointing, bf16

def with_dropout(model, p=0.2):
    """Dropout after every MLP of both towers: pass 2 must replay pass 1's masks exactly."""
    for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
        block.mlp.register_forward_hook(lambda module, args, out: torch.nn.functional.dropout(out, p, module.training))
    return model


def reference_gradients(micro_batches, model):
    """Every micro-batch forwarded with its graph kept, one loss over all features, one backward."""
    outs = [model(images, texts) for images, texts, _ in micro_batches]
    loss = infonce_loss(torch.cat([o["image_features"] for o in outs]), torch.cat([o["text_features"] for o in outs]),
                        outs[0]["logit_scale"])
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_dropout_is_replayed_exactly():
    batch = split(global_batch(), 16)

    def model_with_dropout():
        torch.manual_seed(0)
        return with_dropout(create_model(stage_config("clipa-tiny", GEOMETRY))).train()

    model = model_with_dropout()
    loss_acc = ContrastiveStep(model, model, infonce_loss, Accelerator(cpu=True))(batch).item()
    acc = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    loss_ref, ref = reference_gradients(batch, model_with_dropout())  # same RNG stream from the same seed
    assert loss_acc == pytest.approx(loss_ref, rel=1e-6)
    assert_same_gradients(acc, ref)
    # The dropout is live: other masks (another RNG state) give other gradients, so a replay that
    # did not restore the RNG would fail the check above.
    model = model_with_dropout()
    torch.manual_seed(1)
    _, other = reference_gradients(batch, model)
    err = (other["visual.proj"] - ref["visual.proj"]).norm() / ref["visual.proj"].norm()
    assert err > 1e-3


def test_grad_checkpointing_on_both_towers_is_exact():
    batch = global_batch()
    _, big = gradients(split(batch, 64))
    torch.manual_seed(0)
    model = create_model(stage_config("clipa-tiny", GEOMETRY))
    model.set_grad_checkpointing(True)
    assert model.visual.transformer.grad_checkpointing and model.transformer.grad_checkpointing
    model.train()
    ContrastiveStep(model, model, infonce_loss, Accelerator(cpu=True))(split(batch, 16))
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert_same_gradients({name: p.grad for name, p in model.named_parameters()}, big)


@pytest.mark.slow
def test_bf16_accumulation_matches_bf16_big_step():
    from accelerate.state import AcceleratorState

    batch = global_batch(32)
    results = []
    AcceleratorState._reset_state(reset_partial_state=True)  # the precision is process-wide in accelerate
    try:
        for micro in (32, 8):
            torch.manual_seed(0)
            model = create_model(stage_config("clipa-tiny", GEOMETRY)).train()
            accelerator = Accelerator(cpu=True, mixed_precision="bf16")
            loss = ContrastiveStep(model, model, infonce_loss, accelerator)(split(batch, micro)).item()
            results.append((loss, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    (loss_big, big), (loss_acc, acc) = results
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)  # the fp32 loss over the same bf16 features
    # Whole-model gradient: bf16 rounding of 8- vs 32-row matmuls leaves ~2e-3 relative here, ten
    # times below bf16's own distance from fp32 (~2e-2) and naive accumulation's error (> 1e-2).
    assert big.keys() == acc.keys()
    flat_big, flat_acc = (torch.cat([g[name].flatten() for name in big]) for g in (big, acc))
    assert (flat_acc - flat_big).norm() / flat_big.norm() < 5e-3


def test_logit_scale_clamp_bounds_the_temperature():
    import math

    from clipa.train.step import clamp_logit_scale

    model = create_model(stage_config("clipa-tiny", GEOMETRY))
    for value, expected in ((math.log(500.0), math.log(100.0)), (-1.0, 0.0), (2.0, 2.0)):
        with torch.no_grad():
            model.logit_scale.fill_(value)
        clamp_logit_scale(model, math.log(100.0))
        assert model.logit_scale.item() == pytest.approx(expected)
        assert model.logit_scale.requires_grad  # still the trained parameter, not a copy
