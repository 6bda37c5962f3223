"""`clipa bench` measures every token-reduction setting with clipa's own step and reports ratios."""

import json

import pytest

from clipa.bench import default_settings

from conftest import run_in_process


@pytest.mark.slow
def test_bench_reports_every_setting_with_consistent_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = run_in_process("bench", "--arch", "clipa-tiny", "--batch", "4", "--steps", "1", "--repeats", "2",
                            "--output", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    labels = [s.label for s in default_settings("clipa-tiny")]
    assert [r["setting"] for r in rows] == labels
    full = rows[0]
    assert full["speedup"] == 1.0 and full["flop_ratio"] == 1.0 and (full["image_tokens"], full["text_tokens"]) == (65, 32)
    by_label = {r["setting"]: r for r in rows}
    assert by_label["random mask 0.75"]["image_tokens"] == 17  # 64 patches -> 16 kept + class token
    assert by_label["resize 32px"]["image_tokens"] == 17
    assert by_label["text 8 truncate"]["text_tokens"] == 8
    for r in rows:
        assert r["repeats"] == 2 and r["samples_per_s"] > 0
        assert r["flop_ratio"] == pytest.approx(full["flops_per_sample"] / r["flops_per_sample"])
        # efficiency = speedup / FLOP ratio per repeat; the FLOP ratio is the same in both repeats, so the
        # median efficiency is the median speedup over the ratio, and with 2 repeats the median is the
        # midpoint of the two (the range's ends).
        low, high = r["efficiency_range"]
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flop_ratio"], rel=1e-9)
        assert r["efficiency"] == pytest.approx((low + high) / 2, rel=1e-9)
        assert 0 < low <= high
    assert all(r["flop_ratio"] > 1.0 for r in rows[1:])  # every setting drops tokens
    assert "efficiency" in result.stdout


def test_bench_rejects_zero_repeats():
    result = run_in_process("bench", "--arch", "clipa-tiny", "--repeats", "0")
    assert result.returncode == 2 and "--repeats" in result.stderr


def _measured_train_flops(setting):
    """Training FLOPs per sample of `setting`, counted by torch's FlopCounterMode on the real model and
    step (math attention, so attention matmuls are counted): independent of clipa.flops' formula."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clipa.bench import SettingRunner

    runner = SettingRunner("clipa-tiny", setting, batch=2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        runner.contrastive_step(runner.micro_batches)
    return counter.get_total_flops() / 2


def test_bench_flop_ratio_matches_torch_flop_counter():
    """The FLOP ratio a bench row reports (full / reduced) against the ratio FlopCounterMode measures on
    the step bench times, for a resize, a mask and a text setting. Within 3 %: the counter also sees
    the contrastive logits and the exact step's extra no-grad forward, which the analytic count leaves out."""
    from clipa.bench import SettingRunner

    settings = {s.label: s for s in default_settings("clipa-tiny")}
    full = settings["full 64px / 32 tok"]
    full_flops = _measured_train_flops(full)
    full_row = SettingRunner("clipa-tiny", full, batch=2).row(1.0)
    for label in ("resize 32px", "random mask 0.75", "text 8 truncate"):
        row = SettingRunner("clipa-tiny", settings[label], batch=2).row(1.0)
        reported = full_row["flops_per_sample"] / row["flops_per_sample"]
        assert reported == pytest.approx(full_flops / _measured_train_flops(settings[label]), rel=0.03), label
