"""`clipa bench` measures every token-reduction setting with clipa's own step and reports ratios."""

import json

import pytest

from conftest import run_in_process
from clipa.bench import default_settings


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
        low, high = r["efficiency_range"]
        assert low <= r["efficiency"] <= high
    assert all(r["flop_ratio"] > 1.0 for r in rows[1:])  # every setting drops tokens
    assert "efficiency" in result.stdout


def test_bench_rejects_zero_repeats():
    result = run_in_process("bench", "--arch", "clipa-tiny", "--repeats", "0")
    assert result.returncode == 2 and "--repeats" in result.stderr
