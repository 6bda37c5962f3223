"""The suite runs offline and isolated (conftest.py): no test downloads, reads a developer's caches or
logs to a real tracker account, in this process or in the processes it starts."""

import json
import os
import subprocess
import sys

import huggingface_hub.constants

import conftest


def test_this_process_and_its_children_see_only_the_suites_own_offline_caches():
    probe = ("import json, os, huggingface_hub.constants as c, torch.hub; print(json.dumps({'hub': c.HF_HUB_CACHE, "
             "'offline': c.HF_HUB_OFFLINE, 'torch': torch.hub.get_dir(), 'token': os.environ.get('HF_TOKEN'), "
             "'wandb_key': os.environ.get('WANDB_API_KEY'), 'mlflow': os.environ.get('MLFLOW_TRACKING_URI')}))")
    child = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    here = {"hub": huggingface_hub.constants.HF_HUB_CACHE, "offline": huggingface_hub.constants.HF_HUB_OFFLINE}
    for seen in (child, here):
        assert seen["hub"].startswith(conftest.ISOLATED_HOME), seen
        assert seen["offline"] is True
    assert child["torch"].startswith(conftest.ISOLATED_HOME)
    assert child["token"] is None and child["wandb_key"] is None and child["mlflow"] is None
    assert os.environ["WANDB_MODE"] == "offline"


def test_the_longest_first_order_names_test_files_that_exist_and_leads_the_collection(request):
    """CI's scheduling order (conftest.LONGEST_FIRST) names real files, so a renamed file cannot drop out of
    it unnoticed, and the whole suite's collection starts with them, in that order."""
    here = {p.name for p in conftest.REPO.joinpath("tests").glob("test_*.py")}
    assert set(conftest.LONGEST_FIRST) <= here, set(conftest.LONGEST_FIRST) - here
    # The order this session's own collection was given (CI's run, each pytest-xdist worker's, `-m "not slow"`);
    # a run of a file or two, which holds fewer than two of those files, collects the suite in a fresh process.
    files = list(dict.fromkeys(item.path.name for item in request.session.items))
    if len(set(files) & set(conftest.LONGEST_FIRST)) < 2:
        listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 "tests"], cwd=conftest.REPO, capture_output=True, text=True, timeout=300)
        assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
        files = list(dict.fromkeys(line.split("::")[0].rsplit("/", 1)[-1] for line in listed.stdout.splitlines()
                                   if "::" in line))
    ranked = [name for name in conftest.LONGEST_FIRST if name in files]
    assert files[:len(ranked)] == ranked, files[:len(ranked)]  # first, and in LONGEST_FIRST's order


def test_a_process_that_loads_the_suites_settings_removes_its_isolated_home(tmp_path):
    """Each process that loads conftest.py (pytest, each xdist worker) removes its isolated home when it ends:
    a suite that left them behind filled CI's disk."""
    probe = "import sys; sys.path.insert(0, 'tests'); import conftest; print(conftest.ISOLATED_HOME)"
    child = subprocess.run([sys.executable, "-c", probe], cwd=conftest.REPO, capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert child.returncode == 0, child.stderr[-2000:]
    home = child.stdout.strip().splitlines()[-1]
    assert home.startswith(str(tmp_path)), home  # it was made where TMPDIR said
    assert not list(tmp_path.glob("clipa-tests-home-*")), list(tmp_path.iterdir())
