"""`clipa bench` measures every token-reduction setting with clipa's own step and reports ratios."""

import json

import pytest

from clipa.train.bench import default_settings

from conftest import run_in_process


@pytest.mark.slow
def test_bench_reports_every_setting_measured_here(tmp_path):
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
    for r in rows:  # measured on this machine: only their sign is known here (the arithmetic: below)
        assert r["repeats"] == 2 and r["samples_per_s"] > 0 and 0 < r["efficiency_range"][0] <= r["efficiency_range"][1]
    assert all(r["flop_ratio"] > 1.0 for r in rows[1:])  # every setting drops tokens
    assert "efficiency" in result.stdout


# Scripted step times (seconds) for run_bench(batch=4, steps=2, repeats=2): the first of each list is
# the untimed warm-up. The full setting takes 0.4 s a step; each reduced setting, in its two repeats:
FULL_STEPS = [9.9] + [0.4] * 8
REDUCED_STEPS = ([9.9, 0.1, 0.2], [9.9, 0.2, 0.4])
# By hand: repeat 1 pairs 0.4/0.1 and 0.4/0.2 -> speedups 4, 2 -> median 3; reduced step median 0.15 s.
# Repeat 2: 0.4/0.2, 0.4/0.4 -> 2, 1 -> median 1.5; step median 0.3 s. Over repeats: speedup median
# (3 + 1.5) / 2 = 2.25; samples/s median of 4/0.15 and 4/0.3 = (26.67 + 13.33) / 2 = 20; efficiency
# 2.25 / FLOP ratio within [1.5, 3] / FLOP ratio. The full row: 4 / 0.4 = 10 samples/s.


def test_bench_pairs_and_repeats_give_hand_computed_medians(monkeypatch):
    import itertools

    from clipa.model.build import Geometry, stage_config
    from clipa.train.bench import SettingRunner, run_bench

    def without_a_model(self, arch, setting, batch):  # what row() reads; no model, the steps are scripted
        self.arch, self.setting, self.batch, self.text_select_s = arch, setting, batch, 0.0
        self.cfg = stage_config(arch, Geometry(setting.image_size, setting.text_length))

    full_label = default_settings("clipa-tiny")[0].label
    repeat_of = {}  # label -> how many runners of it were built so far

    def scripted_step(self):
        if not hasattr(self, "_times"):
            if self.setting.label == full_label:
                self._times = iter(FULL_STEPS * 100)  # one runner, kept for every pair
            else:
                repeat = repeat_of.get(self.setting.label, 0)
                repeat_of[self.setting.label] = repeat + 1
                self._times = itertools.chain(REDUCED_STEPS[repeat])
        return next(self._times)

    monkeypatch.setattr(SettingRunner, "__init__", without_a_model)
    monkeypatch.setattr(SettingRunner, "step", scripted_step)
    rows = run_bench(["clipa-tiny"], batch=4, steps=2, repeats=2)
    full = rows[0]
    assert full["samples_per_s"] == pytest.approx(10.0) and full["step_s"] == pytest.approx(0.4)
    assert len(rows) == len(default_settings("clipa-tiny")) and set(repeat_of.values()) == {2}
    for r in rows[1:]:
        ratio = full["flops_per_sample"] / r["flops_per_sample"]
        assert r["flop_ratio"] == pytest.approx(ratio) and ratio > 1.0
        assert r["speedup"] == pytest.approx(2.25), r["setting"]
        assert r["samples_per_s"] == pytest.approx(20.0) and r["step_s"] == pytest.approx(0.225)
        assert r["efficiency"] == pytest.approx(2.25 / ratio)
        assert r["efficiency_range"] == pytest.approx([1.5 / ratio, 3.0 / ratio])


def test_bench_rejects_zero_repeats():
    result = run_in_process("bench", "--arch", "clipa-tiny", "--repeats", "0")
    assert result.returncode == 2 and "--repeats" in result.stderr


def _measured_train_flops(setting):
    """Training FLOPs per sample of `setting`, counted by torch's FlopCounterMode on the real model and
    step (math attention, so attention matmuls are counted): independent of clipa.cost.flops' formula."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clipa.train.bench import SettingRunner

    runner = SettingRunner("clipa-tiny", setting, batch=2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        runner.contrastive_step(runner.micro_batches)
    return counter.get_total_flops() / 2


def test_bench_flop_ratio_matches_torch_flop_counter():
    """The FLOP ratio a bench row reports (full / reduced) against the ratio FlopCounterMode measures on
    the step bench times, for a resize, a mask and a text setting. Within 3 %: the counter also sees
    the contrastive logits and the exact step's extra no-grad forward, which the analytic count leaves out."""
    from clipa.train.bench import SettingRunner

    settings = {s.label: s for s in default_settings("clipa-tiny")}
    full = settings["full 64px / 32 tok"]
    full_flops = _measured_train_flops(full)
    full_row = SettingRunner("clipa-tiny", full, batch=2).row(1.0)
    for label in ("resize 32px", "random mask 0.75", "text 8 truncate"):
        row = SettingRunner("clipa-tiny", settings[label], batch=2).row(1.0)
        reported = full_row["flops_per_sample"] / row["flops_per_sample"]
        assert reported == pytest.approx(full_flops / _measured_train_flops(settings[label]), rel=0.03), label
