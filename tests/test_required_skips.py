"""CLIPA_REQUIRE (tests/conftest.py): CI's list of what must be present turns a skip for it into a failure.
A small test file runs through pytest in this process with this suite's conftest as its plugin."""

import os
import sys

import pytest

import conftest

SKIPPING = '''
import pytest

def test_drawings():
    pytest.skip("needs Debian's openclipart-svg and openclipart-png")

@pytest.mark.skipif(True, reason="needs Debian's openclipart-svg")  # as tests/test_openclipart.py skips
def test_drawings_marked():
    pass

def test_package():
    pytest.importorskip("no_such_package_for_clipa")

def test_other():
    pytest.skip("not this platform")

@pytest.mark.gpu
def test_gpu():
    pass

def test_plain():
    pass
'''


class Outcomes:
    """A pytest plugin that keeps every test's (or a skipped module's) final outcome."""

    def __init__(self):
        self.of = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.of[report.nodeid.split("::")[-1]] = report.outcome

    def pytest_collectreport(self, report):
        if report.outcome != "passed":
            self.of[report.nodeid] = report.outcome


def outcomes(tmp_path, monkeypatch, require: str) -> dict[str, str]:
    """SKIPPING run under this suite's conftest with CLIPA_REQUIRE=`require`: test name -> outcome."""
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "test_skipped_module.py").write_text('import pytest\npytest.importorskip("no_such_package_for_clipa")\n')
    monkeypatch.setenv("CLIPA_REQUIRE", require)
    monkeypatch.chdir(tmp_path)
    seen = Outcomes()
    # importlib mode: each test's copy of test_skipping.py is its own module; a module skip refused at collection
    # would stop the session (as it does in CI), so the inner run goes on to show the other outcomes too.
    # The inner run's test modules leave sys.modules (a skipped module too, half-imported); the next test's run
    # would reuse them and collect nothing, so they go (only they: a module another test imported stays).
    loaded = set(sys.modules)
    try:
        pytest.main(["-q", "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(tmp_path),
                     "--import-mode=importlib", "--continue-on-collection-errors", "test_skipping.py",
                     "test_skipped_module.py"], plugins=[conftest, seen])
    finally:
        for name in {name for name in set(sys.modules) - loaded if "test_skipp" in name}:
            del sys.modules[name]
    return seen.of


def test_named_requirements_fail_their_skips_and_nothing_else(tmp_path, monkeypatch):
    assert outcomes(tmp_path, monkeypatch, "openclipart, no_such_package_for_clipa") == {
        "test_drawings": "failed", "test_drawings_marked": "failed",
        "test_package": "failed", "test_other": "skipped", "test_gpu": "skipped",
        "test_plain": "passed", "test_skipped_module.py": "failed"}


def test_all_fails_every_skip_but_the_gpu_ones(tmp_path, monkeypatch):
    assert outcomes(tmp_path, monkeypatch, "all") == {
        "test_drawings": "failed", "test_drawings_marked": "failed",
        "test_package": "failed", "test_other": "failed", "test_gpu": "skipped",
        "test_plain": "passed", "test_skipped_module.py": "failed"}


def test_without_clipa_require_a_skip_stays_a_skip(tmp_path, monkeypatch):
    assert outcomes(tmp_path, monkeypatch, "") == {
        "test_drawings": "skipped", "test_drawings_marked": "skipped",
        "test_package": "skipped", "test_other": "skipped", "test_gpu": "skipped",
        "test_plain": "passed", "test_skipped_module.py": "skipped"}
