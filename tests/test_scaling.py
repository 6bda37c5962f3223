"""`clipa scaling fit`: power-law fits of zero-shot error against compute, from JSON or run directories."""

import json
import re

import numpy as np
import pytest

from clipa.analysis.fit import fit_power_law, t_quantile
from clipa.analysis.points import load_points
from clipa.errors import ClipaError

from conftest import RECIPES
from test_cli import assert_user_error


def synthetic(alpha, beta, e=0.0, n=10, noise=0.0, seed=0):
    compute = np.logspace(18, 22, n)
    rng = np.random.default_rng(seed)
    return compute, (beta * compute ** alpha + e) * np.exp(rng.normal(0.0, noise, n))


def test_t_quantile():
    assert t_quantile(1) == pytest.approx(12.706)
    assert t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile(31) == pytest.approx(2.040, abs=2e-3)
    assert t_quantile(10_000) == pytest.approx(1.960, abs=1e-3)


def test_fit_recovers_exact_power_law():
    compute, error = synthetic(-0.05, 2.5)
    fit = fit_power_law(compute, error)
    assert fit.alpha == pytest.approx(-0.05, rel=1e-9) and fit.beta == pytest.approx(2.5, rel=1e-7)
    assert fit.e is None and fit.rmse_log < 1e-10
    fit = fit_power_law(*synthetic(-0.08, 10.0, e=0.15), offset=True)
    assert fit.alpha == pytest.approx(-0.08, rel=1e-3) and fit.beta == pytest.approx(10.0, rel=1e-2)
    assert fit.e == pytest.approx(0.15, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confidence_intervals_cover_the_truth_with_noise(seed):
    fit = fit_power_law(*synthetic(-0.05, 2.5, n=8, noise=0.01, seed=seed))
    assert fit.alpha_ci[0] < -0.05 < fit.alpha_ci[1] and fit.beta_ci[0] < 2.5 < fit.beta_ci[1]
    assert fit.alpha_ci[1] - fit.alpha_ci[0] < 0.02
    fit = fit_power_law(*synthetic(-0.08, 10.0, e=0.15, n=12, noise=0.005, seed=seed), offset=True)
    assert fit.alpha_ci[0] < -0.08 < fit.alpha_ci[1]
    assert fit.beta_ci[0] < 10.0 < fit.beta_ci[1]
    assert fit.e_ci[0] < 0.15 < fit.e_ci[1]
    # the extrapolation's band contains the true curve
    mean, low, high = fit.predict(1e23)
    assert low < 10.0 * 1e23 ** -0.08 + 0.15 < high and low < mean < high


def test_too_few_points():
    with pytest.raises(ClipaError, match="at least 3 points"):
        fit_power_law([1e18, 1e19], [0.5, 0.4])
    with pytest.raises(ClipaError, match="at least 4 points"):
        fit_power_law([1e18, 1e19, 1e20], [0.5, 0.4, 0.35], offset=True)
    with pytest.raises(ClipaError, match="same compute"):
        fit_power_law([1e18] * 3, [0.5, 0.4, 0.35])


def test_json_inputs(tmp_path):
    (tmp_path / "points.json").write_text(json.dumps([{"compute": 1e18, "error": 0.5}, {"compute": 1e19, "acc1": 0.6}]))
    bench = {"dataset": "imagenet1k", "model": "ViT-B-16", "pretrained": "mine", "task": "zeroshot_classification",
             "metrics": {"acc1": 0.7, "acc5": 0.9, "mean_per_class_recall": 0.69}, "language": "en", "compute": 1e20}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    points = load_points([tmp_path / "points.json", tmp_path / "bench.json"])
    assert [(p.compute, round(p.error, 6)) for p in points] == [(1e18, 0.5), (1e19, 0.4), (1e20, 0.3)]
    assert points[2].label == "mine"
    assert load_points([tmp_path / "bench.json"], metric="acc5")[0].error == pytest.approx(0.1)
    (tmp_path / "pct.json").write_text(json.dumps({**bench, "metrics": {"acc1": 70.0}}))
    with pytest.raises(ClipaError, match="percentage"):
        load_points([tmp_path / "pct.json"])
    (tmp_path / "nocompute.json").write_text(json.dumps({k: v for k, v in bench.items() if k != "compute"}))
    with pytest.raises(ClipaError, match='no "compute"'):
        load_points([tmp_path / "nocompute.json"])


def fake_run(root, name, stage_recipe, samples, acc1=None, eval_row=None, overrides=()):
    """A run directory as clipa writes it: config.toml, metrics.jsonl, optionally a zero-shot result."""
    from clipa.recipe.load import load_recipe, save

    run = root / name
    run.mkdir(parents=True)
    save(load_recipe(RECIPES / stage_recipe, list(overrides)), run / "config.toml")
    rows = [{"step": s // 256, "samples": s, "loss": 1.0} for s in (samples // 2, samples)]
    if eval_row:
        rows.append(eval_row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if acc1 is not None:
        result = {"dataset": "synthetic", "model": str(run), "pretrained": name, "task": "zeroshot_classification",
                  "metrics": {"acc1": acc1, "acc5": 0.99, "mean_per_class_recall": acc1}, "language": "en"}
        (run / "zeroshot_synthetic.json").write_text(json.dumps(result))
    return run


def test_run_directories_count_every_stage(tmp_path):
    from clipa.cost.flops import train_flops_per_sample
    from clipa.model.build import Geometry, stage_config

    pre = fake_run(tmp_path / "runs", "pre", "tiny/pretrain.toml", 64_000)
    (pre / "checkpoints" / "step_000100").mkdir(parents=True)  # a step checkpoint holds its own config.toml
    (pre / "checkpoints" / "step_000100" / "config.toml").write_text((pre / "config.toml").read_text())
    ft = fake_run(tmp_path / "runs", "ft", "tiny/finetune.toml", 12_800, acc1=0.75,
                  overrides=[f"init.checkpoint={pre}/checkpoints/step_000100"])
    (point,) = load_points([ft])
    # up to step 100 of tiny/pretrain: 64 px with 75% of the patches masked, 8 tokens
    pre_flops = train_flops_per_sample(stage_config("clipa-tiny", Geometry(64, 8)), 64, 8, 0.25) * 100 * 256
    ft_flops = train_flops_per_sample(stage_config("clipa-tiny", Geometry(64, 32)), 64, 32, 0.7) * 12_800  # 30% masked
    assert point.compute == pytest.approx(pre_flops + ft_flops)
    assert point.error == pytest.approx(0.25) and point.label == "ft"
    # an evaluation row in metrics.jsonl serves when there is no zeroshot_*.json
    solo = fake_run(tmp_path / "runs", "solo", "tiny/pretrain.toml", 64_000,
                    eval_row={"step": 250, "zeroshot/synthetic/acc1": 0.4})
    (point,) = load_points([solo])
    assert point.error == pytest.approx(0.6)
    assert point.compute == pytest.approx(train_flops_per_sample(stage_config("clipa-tiny", Geometry(64, 8)), 64, 8, 0.25)
                                          * 64_000)


def test_cli_fit_and_plot(cli, tmp_path):
    compute, error = synthetic(-0.08, 10.0, e=0.15, n=8, noise=0.003)
    path = tmp_path / "points.json"
    path.write_text(json.dumps([{"compute": c, "error": e} for c, e in zip(compute, error)]))
    result = cli("scaling", "fit", path, "--offset", "--target-compute", "1e23", "--plot", tmp_path / "fit.png")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    number = r"(-?[0-9.]+(?:e[+-]?[0-9]+)?)"
    ci = rf"{number}\s+95% CI \[{number}, {number}\]"
    fitted = {name: tuple(map(float, re.search(rf"^{name}\s+= {ci}", out, re.M).groups())) for name in ("alpha", "beta", "e")}
    # The printed fit recovers the generating law (alpha -0.08, beta 10, e 0.15, 0.3 % noise) and its
    # intervals cover it; a wrong fit or a misprinted value fails here.
    truth = {"alpha": -0.08, "beta": 10.0, "e": 0.15}
    tolerance = {"alpha": 0.01, "beta": 2.0, "e": 0.02}
    for name, (value, low, high) in fitted.items():
        assert value == pytest.approx(truth[name], abs=tolerance[name]), (name, out)
        assert low < truth[name] < high and low < value < high, (name, out)
    alpha, beta, e = (fitted[name][0] for name in ("alpha", "beta", "e"))
    # the "fitted" column is the printed law at each point's compute (to the 4 printed digits)
    rows = re.findall(r"points.json\[\d\]\s*│\s*(\S+)\s*│\s*(\S+)\s*│\s*(\S+)", out)
    assert len(rows) == 8
    for (c, err, fit), c_true, err_true in zip(rows, compute, error, strict=True):
        assert float(c) == pytest.approx(c_true, rel=5e-3) and float(err) == pytest.approx(err_true, abs=1e-4)
        assert float(fit) == pytest.approx(beta * float(c) ** alpha + e, abs=2e-3)
    predicted = re.search(rf"at C = 1e\+23 FLOPs .*: error {number} \[{number}, {number}\], acc1 {number}", out)
    assert predicted, out
    err, low, high, acc1 = map(float, predicted.groups())
    true_error = 10.0 * 1e23 ** -0.08 + 0.15
    assert low < true_error < high and err == pytest.approx(true_error, abs=0.005)
    assert acc1 == pytest.approx(1 - err, abs=1e-4)
    from PIL import Image

    with Image.open(tmp_path / "fit.png") as image:
        assert image.format == "PNG" and image.size == (900, 620)


def test_cli_bad_inputs_exit_2(cli, tmp_path):
    png = ["--plot", tmp_path / "x.png"]
    assert_user_error(cli("scaling", "fit", tmp_path / "missing.json", *png), "missing.json: does not exist")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert_user_error(cli("scaling", "fit", empty, *png), "not a clipa run directory")
    run = fake_run(tmp_path / "runs", "noresult", "tiny/pretrain.toml", 64_000)
    assert_user_error(cli("scaling", "fit", run, *png), "no zero-shot result")
    two = tmp_path / "two.json"
    two.write_text(json.dumps([{"compute": 1e18, "error": 0.5}, {"compute": 1e19, "error": 0.4}]))
    assert_user_error(cli("scaling", "fit", two, *png), "need at least 3 points, got 2")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_user_error(cli("scaling", "fit", bad, *png), "not valid JSON")
    assert not (tmp_path / "x.png").exists()
