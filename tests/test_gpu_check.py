"""benchmarks/gpu_check.py in its CPU mode, so the GPU acceptance check cannot rot between GPU runs."""

import importlib.util
import json
import re
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO


def _gpu_check():
    """benchmarks/gpu_check.py as a module (it puts benchmarks/ on sys.path for loader_speed, as when run)."""
    if "gpu_check" not in sys.modules:  # its dataclass needs the module registered while it is defined
        spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def scripted_checker(gc, tmp_path, runs):
    """A Checker whose `clipa pretrain` runs are scripted: name -> (losses by step, samples/s, MFU) rows."""
    checker = gc.Checker(tmp_path, "clipa-tiny", 32, 8, batch=16, steps=3, cuda=False)

    def run(name, *extra, env=None, launcher=None):
        out = tmp_path / name
        out.mkdir(parents=True)
        rows = [{"step": step, "loss": loss, "samples_per_s": rate, "mfu": mfu} for step, loss, rate, mfu in runs[name]]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return out, SimpleNamespace(returncode=0)

    checker.run = run
    return checker


def statuses(rows):
    return {row.name.split(" (")[0]: (row.status, row.value) for row in rows}


def test_precision_rows_judge_the_loss_gap_and_the_throughput(tmp_path):
    gc = _gpu_check()
    fp32 = [(1, 3.40, 900.0, 0.20), (2, 3.20, 100.0, 0.05), (3, 3.00, 120.0, 0.06)]
    close = [(1, 3.41, 500.0, 0.10), (2, 3.23, 50.0, 0.02), (3, 3.04, 70.0, 0.04)]  # at most 0.04 apart
    rows = statuses(scripted_checker(gc, tmp_path / "a", {"fp32": fp32, "bf16": close}).precision())
    # medians after the first step, by hand: fp32 110 samples/s, MFU 0.055; bf16 60, 0.03
    assert rows == {"bf16 vs fp32": ("PASS", "max |loss diff| 0.0400"),
                    "throughput fp32": ("PASS", "110.0 samples/s, MFU 0.055"),
                    "throughput bf16": ("PASS", "60.0 samples/s, MFU 0.030")}
    apart = [(1, 3.41, 500.0, 0.10), (2, 3.23, 0.0, 0.0), (3, 3.10, 0.0, 0.0)]  # step 3 0.10 off, no samples
    rows = statuses(scripted_checker(gc, tmp_path / "b", {"fp32": fp32, "bf16": apart}).precision())
    assert rows["bf16 vs fp32"] == ("FAIL", "max |loss diff| 0.1000") and rows["throughput bf16"][0] == "FAIL"
    impossible = [(1, 3.40, 900.0, 0.2), (2, 3.20, 100.0, 1.5), (3, 3.00, 120.0, 1.7)]  # MFU above 1
    short = [(1, 3.40, 900.0, 0.2), (2, 3.20, 100.0, float("nan"))]  # a step missing, MFU NaN
    rows = statuses(scripted_checker(gc, tmp_path / "c", {"fp32": impossible, "bf16": short}).precision())
    assert [status for status, _ in rows.values()] == ["FAIL"] * 3


def test_loader_rows_pass_when_the_loader_keeps_up_with_the_step(tmp_path, monkeypatch):
    import loader_speed

    gc = _gpu_check()
    rates = {32: 300.0, 64: 50.0, 128: 80.0}
    monkeypatch.setattr(loader_speed, "write_shards", lambda *a, **k: tmp_path)
    monkeypatch.setattr(loader_speed, "loader_wall", lambda train, size, **k: rates[size])
    rows = gc.loader_check(tmp_path, [32, 64, 128], micro=16, batches=5, step_rates={32: 200.0, 64: 60.0})
    assert [(r.name, r.status, r.detail) for r in rows] == [
        ("loader 32px", "PASS", "step 200 samples/s"), ("loader 64px", "FAIL", "step 60 samples/s"),
        ("loader 128px", "PASS", "no step measured at this size")]
    assert all(re.fullmatch(r"\d+ samples/s with \d+ workers", r.value) for r in rows)


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_check_and_writes_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    # clipa-micro: the same checks as the default clipa-tiny, at a fraction of the CPU time (bf16 matmuls
    # are ~20x slower than fp32 on a CPU). The script's main() runs in this process; the `clipa pretrain`
    # runs it checks are its own subprocesses, as on a GPU machine.
    code = _gpu_check().main(["--cpu", "--arch", "clipa-micro", "--out", str(out), "--workdir", str(tmp_path / "work")])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    report = json.loads(out.read_text())
    status = {c["name"].split(" (")[0]: c["status"] for c in report["checks"]}
    assert status["bf16 vs fp32"] == status["kill + resume"] == "PASS", report
    assert status["throughput fp32"] == status["throughput bf16"] == "PASS"
    # a speed ratio: on CPU measured and reported, not judged (what else the machine runs moves it)
    bare = next(c for c in report["checks"] if c["name"].startswith("vs bare open_clip"))
    assert status["vs bare open_clip"] == "INFO" and re.search(r"x\d+\.\d\d \(bare \d+\.\d/s\)", bare["value"])
    assert status["FSDP"] == status["DDP"] == status["compile"] == "SKIP"  # CUDA-only here, said so, never a pass
    # The loader rows (their verdict: test_loader_rows_pass_when_the_loader_keeps_up_with_the_step) are judged
    # against the step rate of this run's fp32 training at 32 px; nothing trained at 64 px.
    loader = {c["name"]: c for c in report["checks"] if c["name"].startswith("loader")}
    assert loader.keys() == {"loader 32px", "loader 64px"}
    assert all(re.fullmatch(r"\d+ samples/s with \d+ workers", c["value"]) for c in loader.values())
    fp32_rate = float(next(c for c in report["checks"] if c["name"].startswith("throughput fp32"))["value"].split()[0])
    step = re.fullmatch(r"step (\d+) samples/s", loader["loader 32px"]["detail"])
    assert step and abs(int(step[1]) - fp32_rate) <= 0.55, (loader, fp32_rate)
    assert loader["loader 64px"]["detail"] == "no step measured at this size"
    resume = next(c for c in report["checks"] if c["name"].startswith("kill + resume"))
    assert resume["value"] == "max |loss diff| 0.00e+00"  # bitwise on CPU
    assert resume["detail"].startswith("bf16,"), resume  # the CPU suite's bf16 kill + resume check
    assert report["device"] == "cpu" and "clipa GPU acceptance check" in stdout
