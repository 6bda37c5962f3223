"""Published weights by name (open_clip tags, hf-hub:, timm:) from a real Hugging Face cache, offline.

The test writes a cache on disk in the layout huggingface_hub itself writes and reads
(`HF_HOME/hub/models--ORG--NAME/refs/main` naming a snapshot, `snapshots/REV/FILE`) and holds in it
what clipa's users would download: a clipa export published as an open_clip Hub repository, a BERT
tokenizer, and timm weights under timm's own hub id for `test_vit.r160_in1k`. Commands then run in
subprocesses with HF_HOME pointing there and HF_HUB_OFFLINE=1, so open_clip, timm, transformers and
huggingface_hub resolve everything themselves, unmocked; a pretrained tag is registered in open_clip's
registry (an hf_hub entry, as open_clip's own) by the runner script before it calls the CLI.
"""

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import RECIPES, RESIZE_32, tiny_overrides
from test_cli import assert_user_error

pytest.importorskip("transformers")

REV = "c1a9a0000000000000000000000000000000c1a9"  # any 40-hex commit id: refs/main points at it
HUB_MODEL, BERT_MODEL, BERT_TOKENIZER = "clipa-test/tiny-clip", "clipa-test/tiny-bert-clip", "clipa-test/tiny-bert"
TAG = "clipa_test"  # registered for clipa-tiny, pointing at HUB_MODEL
CLASSES = ("circle", "square", "triangle")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", *CLASSES, "."]

RUNNER = textwrap.dedent(f"""
    import json, os, sys, time, traceback, types
    backoff = []
    if os.environ.get("CLIPA_TEST_NO_HUB_BACKOFF"):
        # huggingface_hub retries an unreachable Hub 5 times, sleeping 1+2+4+8+8 s between tries: the library's
        # own behaviour, not clipa's. Its sleeps are counted here instead of slept (the tries still happen).
        import huggingface_hub.utils._http as hub_http
        hub_http.time = types.SimpleNamespace(**{{**{{k: getattr(time, k) for k in dir(time) if not k.startswith("_")}},
                                                 "sleep": backoff.append}})
    from open_clip import pretrained
    # open_clip has no public call that adds a pretrained tag; its registry is this dict, and the entry is
    # built by its own helper exactly like the shipped hf_hub entries ("org/name/" = the default file).
    pretrained._PRETRAINED.setdefault("clipa-tiny", {{}})["{TAG}"] = pretrained._pcfg(hf_hub="{HUB_MODEL}/")
    from typer.testing import CliRunner
    from clipa.cli.app import app
    results = []
    for args in json.loads(sys.argv[1]):
        r = CliRunner().invoke(app, args, env={{"COLUMNS": "200"}})
        if r.exception and not isinstance(r.exception, SystemExit):
            traceback.print_exception(r.exception)
        results.append({{"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "backoff": backoff[:]}})
        backoff.clear()
    print("RESULTS" + json.dumps(results))
""")


class Result:
    def __init__(self, code, stdout, stderr, backoff=()):
        self.returncode, self.stdout, self.stderr = code, stdout, stderr
        self.backoff = backoff  # the seconds huggingface_hub would have slept between retries (CLIPA_TEST_NO_HUB_BACKOFF)


def put_in_cache(hf_home: Path, repo: str, files: dict) -> Path:
    """Write `files` (name -> bytes or source path) as huggingface_hub's cache holds a downloaded repo."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / REV
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(REV)
    for name, content in files.items():
        (snapshot / name).write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
    return snapshot


def hf_env(hf_home: Path, offline: bool = True, **extra) -> dict:
    env = dict(os.environ, HF_HOME=str(hf_home), PYTHONUNBUFFERED="1", COLUMNS="200", **extra)
    env.pop("HF_HUB_CACHE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:  # the suite's conftest sets all three for every test; a download test clears them
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            env.pop(name, None)
    return env


def run_commands(tmp: Path, env: dict, commands: list[list]) -> list[Result]:
    """Run CLI commands in one fresh Python process (so HF_* apply from its start), with the test tag."""
    script = tmp / "runner.py"
    script.write_text(RUNNER)
    proc = subprocess.run([sys.executable, str(script), json.dumps([[str(a) for a in c] for c in commands])],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp)
    assert "RESULTS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    return [Result(r["code"], r["stdout"], r["stderr"], r["backoff"]) for r in results]


def metrics(path: Path) -> dict:
    m = json.loads(path.read_text())["metrics"]
    return {k: m[k] for k in ("acc1", "acc5", "mean_per_class_recall")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """Two trained stages exported and published into a Hugging Face cache, plus a BERT model and timm weights."""
    from transformers import BertTokenizerFast

    from clipa.model.build import arch_config, create_model

    from conftest import run_in_process as cli

    tmp = tmp_path_factory.mktemp("published")
    hf_home = tmp / "hf"
    eval_root = tmp / "eval"
    gen = torch.Generator().manual_seed(0)
    for i, name in enumerate(CLASSES):
        (eval_root / name).mkdir(parents=True)
        for j in range(2):
            pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(eval_root / name / f"{j}.png")

    # the 32 px first stage: the model card shows a resized and a masked stage, the export a change of size
    assert cli("pretrain", "tiny/pretrain", *tiny_overrides(), *RESIZE_32, "--out", tmp / "runs" / "pre").returncode == 0
    result = cli("finetune", "tiny/finetune", *tiny_overrides(), f"init.checkpoint={tmp / 'runs' / 'pre'}",
                 "--out", tmp / "runs" / "ft")
    assert result.returncode == 0, result.stderr
    assert cli("export", tmp / "runs" / "ft", tmp / "export").returncode == 0
    export = tmp / "export"
    put_in_cache(hf_home, HUB_MODEL, {p.name: p for p in export.iterdir()})

    # A CLIPA-v2-style model: open_clip text tower with a BERT word-piece tokenizer from the Hub.
    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    takes = "vocab_file" if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab"
    BertTokenizerFast(**{takes: str(vocab)}, do_lower_case=True).save_pretrained(tmp / "tokenizer")
    tokenizer_files = {p.name: p for p in (tmp / "tokenizer").iterdir()}
    # the real bert-base-uncased repository has a config.json too; transformers reads it first
    tokenizer_files["config.json"] = json.dumps({"model_type": "bert", "vocab_size": len(VOCAB)}).encode()
    put_in_cache(hf_home, BERT_TOKENIZER, tokenizer_files)
    cfg = arch_config("clipa-tiny")
    cfg["text_cfg"].update(hf_tokenizer_name=BERT_TOKENIZER, tokenizer_kwargs={"strip_sep_token": True},
                           vocab_size=len(VOCAB))
    torch.manual_seed(0)
    bert_model = create_model(cfg)
    save_file({k: v.contiguous() for k, v in bert_model.state_dict().items()}, str(tmp / "bert.safetensors"))
    config = {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                   "std": [0.26862954, 0.26130258, 0.27577711]}}
    put_in_cache(hf_home, BERT_MODEL, {"open_clip_config.json": json.dumps(config).encode(),
                                       "open_clip_model.safetensors": tmp / "bert.safetensors"})
    local_cfg = json.loads(json.dumps(cfg))  # the same model, its tokenizer from a local folder
    local_cfg["text_cfg"]["hf_tokenizer_name"] = str(tmp / "tokenizer")
    (tmp / "bert_local.json").write_text(json.dumps(local_cfg))

    # timm's own pretrained tag test_vit.r160_in1k, whose weights timm fetches from the hub id timm/test_vit.r160_in1k
    import timm

    torch.manual_seed(1)
    vit = timm.create_model("test_vit", pretrained=False)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp / "test_vit.safetensors"))
    put_in_cache(hf_home, "timm/test_vit.r160_in1k", {"model.safetensors": tmp / "test_vit.safetensors"})
    return {"tmp": tmp, "hf_home": hf_home, "eval": eval_root, "export": export, "cli": cli}


def zeroshot_args(world, model, out, *extra):
    return ["zeroshot", "--model", model, *extra, "--dataset", "imagefolder", "--data-root", world["eval"],
            "--templates", "simple", "--num-workers", "0", "--output", world["tmp"] / out]


@pytest.fixture(scope="module")
def offline(world):
    """Every offline command, run once in one process (HF_HUB_OFFLINE=1, HF_HOME = the test's cache)."""
    tmp = world["tmp"]
    commands = {
        "tag": zeroshot_args(world, "clipa-tiny", "tag.json", "--pretrained", TAG),
        "tag_colon": zeroshot_args(world, f"clipa-tiny:{TAG}", "tag_colon.json"),
        "bert_hub": zeroshot_args(world, f"hf-hub:{BERT_MODEL}", "bert_hub.json"),
        "finetune_tag": ["finetune", "tiny/finetune", *tiny_overrides(), f"init.checkpoint=clipa-tiny:{TAG}",
                         "--out", tmp / "runs" / "from_tag"],
        "models": ["models", "--json"],
        "models_timm": ["models", "--timm", "test_vit", "--json"],
        "validate_tag": ["validate", "tiny/finetune", f"init.checkpoint=clipa-tiny:{TAG}"],
        "dry_run_hub": ["finetune", "tiny/finetune", f"init.checkpoint=hf-hub:{HUB_MODEL}", "--dry-run",
                        "--out", tmp / "runs" / "dry"],
        "miss_tag": zeroshot_args(world, "ViT-B-32", "miss.json", "--pretrained", "laion2b_s34b_b79k"),
        "miss_hub": ["finetune", "tiny/finetune", *tiny_overrides(), "init.checkpoint=hf-hub:clipa-test/absent",
                     "--out", tmp / "runs" / "miss"],
        "miss_timm": ["pretrain", "tiny/pretrain", *tiny_overrides(), "model.image_tower=vit_tiny_patch16_224",
                      "model.image_init=timm:vit_tiny_patch16_224.augreg_in21k", "reduction.image_size=32",
                      "--out", tmp / "runs" / "miss_timm"],
        "validate_lit": ["validate", "lit/vit_b16_locked"],
    }
    results = run_commands(tmp, hf_env(world["hf_home"]), list(commands.values()))
    return dict(zip(commands, results))


@pytest.mark.slow  # trains two tiny stages and runs the CLI in fresh processes
def test_hub_repo_evaluates_exactly_like_the_same_weights_from_a_local_file(world):
    """`--model hf-hub:ORG/NAME` through the real entry point, offline, against `--model ARCH --pretrained FILE`."""
    local = world["cli"](*zeroshot_args(world, "clipa-tiny", "local.json", "--pretrained",
                                        world["export"] / "open_clip_model.safetensors"))
    assert local.returncode == 0, local.stderr
    hub = subprocess.run([sys.executable, "-m", "clipa", *map(str, zeroshot_args(world, f"hf-hub:{HUB_MODEL}", "hub.json"))],
                         env=hf_env(world["hf_home"]), capture_output=True, text=True, timeout=600)
    assert hub.returncode == 0, hub.stderr
    assert metrics(world["tmp"] / "hub.json") == metrics(world["tmp"] / "local.json")
    assert json.loads((world["tmp"] / "hub.json").read_text())["pretrained"] == f"hf-hub:{HUB_MODEL}"


@pytest.mark.slow  # trains two tiny stages and runs the CLI in fresh processes
def test_registered_pretrained_tag_evaluates_and_finetunes(world, offline):
    for name in ("tag", "tag_colon", "finetune_tag"):
        assert offline[name].returncode == 0, (name, offline[name].stderr[-2000:])
    local = world["cli"](*zeroshot_args(world, "clipa-tiny", "local_tag.json", "--pretrained",
                                        world["export"] / "open_clip_model.safetensors"))
    assert local.returncode == 0
    expected = metrics(world["tmp"] / "local_tag.json")
    assert metrics(world["tmp"] / "tag.json") == expected == metrics(world["tmp"] / "tag_colon.json")
    assert (world["tmp"] / "runs" / "from_tag" / "final" / "open_clip_model.safetensors").is_file()
    assert f"note: init.checkpoint clipa-tiny:{TAG}: cached ({HUB_MODEL})" in offline["validate_tag"].stdout
    assert f"init.checkpoint hf-hub:{HUB_MODEL}: cached ({HUB_MODEL})" in offline["dry_run_hub"].stdout


@pytest.mark.slow  # trains two tiny stages and runs the CLI in fresh processes
def test_bert_tokenizer_and_model_config_json_from_the_hub_match_local_files(world, offline):
    """The Hub model's BERT tokenizer comes from the cache by hub id; `--model CFG.json --pretrained FILE`
    (the route for a model config with a weights file) gives the same numbers from local files."""
    assert offline["bert_hub"].returncode == 0, offline["bert_hub"].stderr[-2000:]
    local = world["cli"](*zeroshot_args(world, world["tmp"] / "bert_local.json", "bert_local.json", "--pretrained",
                                        world["tmp"] / "bert.safetensors"))
    assert local.returncode == 0, local.stderr
    assert metrics(world["tmp"] / "bert_hub.json") == metrics(world["tmp"] / "bert_local.json")


@pytest.mark.slow  # trains two tiny stages and runs the CLI in fresh processes
def test_models_lists_open_clip_tags_and_marks_the_cached_ones(world, offline):
    assert offline["models"].returncode == 0, offline["models"].stderr
    listing = json.loads(offline["models"].stdout)
    assert Path(listing["cache_dir"]) == world["hf_home"] / "hub"
    rows = {r["name"]: r for r in listing["models"]}
    assert rows[f"clipa-tiny:{TAG}"]["cached"] is True and rows[f"clipa-tiny:{TAG}"]["hf_hub"] == HUB_MODEL
    clipa_l = rows["ViT-L-14-CLIPA:datacomp1b"]
    assert clipa_l["hf_hub"] == "UCSC-VLAA/ViT-L-14-CLIPA-datacomp1B" and clipa_l["cached"] is False
    assert rows["ViT-B-32:laion2b_s34b_b79k"]["cached"] is False
    timm_rows = {r["name"]: r for r in json.loads(offline["models_timm"].stdout)["models"]}
    assert timm_rows["timm:test_vit.r160_in1k"]["cached"] is True
    assert timm_rows["timm:test_vit2.r160_in1k"]["cached"] is False
    table = world["cli"]("models", "CLIPA")
    assert table.returncode == 0 and "ViT-H-14-CLIPA-336:laion2b" in table.stdout
    assert_user_error(world["cli"]("models", "ViT-Q-99"), 'FILTER: nothing matches "ViT-Q-99"')


@pytest.mark.slow  # trains two tiny stages and runs the CLI in fresh processes
def test_offline_misses_are_one_line_naming_the_weights_and_the_fix(offline):
    assert_user_error(offline["miss_tag"], "--model: ViT-B-32:laion2b_s34b_b79k is not in the Hugging Face cache",
                      'hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K --include "open_clip_*"', "HF_HUB_OFFLINE")
    assert_user_error(offline["miss_hub"], "init.checkpoint: hf-hub:clipa-test/absent is not in the Hugging Face cache",
                      "hf download clipa-test/absent")
    assert_user_error(offline["miss_timm"], "model.image_init: timm:vit_tiny_patch16_224.augreg_in21k is not in the",
                      "hf download timm/vit_tiny_patch16_224.augreg_in21k")
    lit = offline["validate_lit"]
    assert lit.returncode == 0, lit.stderr
    assert ("model.image_init timm:vit_base_patch16_224.augreg_in21k: not cached and HF_HUB_OFFLINE is set; get it "
            "first with `hf download timm/vit_base_patch16_224.augreg_in21k`") in lit.stdout


API_CHECKS = textwrap.dedent("""
    import json, sys
    import torch
    from open_clip.model import resize_pos_embed, resize_text_pos_embed
    from safetensors.torch import load_file
    from clipa.recipe.load import load_recipe
    from clipa.train.trainer import Trainer

    recipes, out, hub_weights, timm_weights, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    report = {}
    # init.checkpoint = hf-hub:...: finetuning at 48 px / 16 tokens resizes the 64 px / 32 token embeddings
    recipe = load_recipe(f"{recipes}/tiny/finetune.toml", overrides + ["init.checkpoint=hf-hub:clipa-test/tiny-clip",
                         "reduction.image_size=48", "reduction.text_length=16"])
    trainer = Trainer(recipe, "finetune", f"{out}/ft_hub")
    loaded, source = trainer.unwrapped.state_dict(), load_file(hub_weights)
    expected = dict(source)
    resize_pos_embed(expected, trainer.unwrapped)
    resize_text_pos_embed(expected, trainer.unwrapped)
    report["image_pos"] = list(loaded["visual.positional_embedding"].shape)
    report["text_pos"] = list(loaded["positional_embedding"].shape)
    report["all_equal"] = all(torch.equal(loaded[k], expected[k]) for k in expected)
    report["steps"] = trainer.run().steps
    # model.image_init = timm:test_vit.r160_in1k: timm loads its tag's weights from the hub cache (at 64 px
    # resized: tiny/pretrain masks, and this timm tower has no patch tokens to drop)
    recipe = load_recipe(f"{recipes}/tiny/pretrain.toml", overrides + ["model.image_tower=test_vit",
                         "model.image_init=timm:test_vit.r160_in1k", "reduction.image=resize", "reduction.image_size=64",
                         "reduction.mask_ratio=0"])
    trunk = Trainer(recipe, "pretrain", f"{out}/timm").unwrapped.visual.trunk.state_dict()
    source = load_file(timm_weights)
    report["timm_equal"] = all(torch.equal(trunk[k], source[k]) for k in trunk if k != "pos_embed")
    report["timm_keys"] = len(trunk)
    report["timm_pos"] = list(trunk["pos_embed"].shape)
    print("REPORT" + json.dumps(report))
""")


@pytest.mark.slow  # trains two tiny stages and runs the CLI in fresh processes
def test_init_checkpoint_from_the_hub_and_a_timm_tag_load_exactly_and_train(world):
    tmp = world["tmp"]
    (tmp / "api.py").write_text(API_CHECKS)
    proc = subprocess.run([sys.executable, str(tmp / "api.py"), str(RECIPES), str(tmp / "api_runs"),
                           str(world["export"] / "open_clip_model.safetensors"), str(tmp / "test_vit.safetensors"),
                           *tiny_overrides()], env=hf_env(world["hf_home"]), capture_output=True, text=True,
                          timeout=900, cwd=tmp)
    assert "REPORT" in proc.stdout, proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert report["image_pos"] == [1 + 6 * 6, 128] and report["text_pos"] == [16, 128]  # 48 px / patch 8, 16 tokens
    assert report["all_equal"] and report["steps"] == 6
    assert report["timm_equal"] and report["timm_keys"] > 10
    assert report["timm_pos"] == [1, 1 + 4 * 4, 64]  # 160 px grid resampled to 64 px / patch 16


@pytest.mark.slow  # trains two tiny stages and runs the CLI in fresh processes
def test_without_network_validate_passes_and_a_download_failure_is_one_line(world, tmp_path):
    """A fresh install: empty cache, not offline, the Hub unreachable (HF_ENDPOINT at a closed local port).
    Every shipped recipe validates; published weights are "not cached; will download on first use"."""
    shipped = sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*.toml"))
    env = hf_env(tmp_path / "empty", offline=False, HF_ENDPOINT="http://127.0.0.1:9", CLIPA_TEST_NO_HUB_BACKOFF="1")
    results = run_commands(tmp_path, env, [["validate", name] for name in shipped]
                           + [zeroshot_args(world, "hf-hub:clipa-test/absent", "x.json")])
    for name, result in zip(shipped, results):
        assert result.returncode == 0, (name, result.stderr)
    by_name = dict(zip(shipped, results))
    assert ("note: model.image_init timm:vit_base_patch16_224.augreg2_in21k_ft_in1k: not cached; will download on "
            "first use (timm/vit_base_patch16_224.augreg2_in21k_ft_in1k)") in by_name["basic/vit_b16_unlocked"].stdout
    released = by_name["vit_l14/finetune_336_released"].stdout
    assert ("note: init.checkpoint ViT-L-14-CLIPA:datacomp1b: not cached; will download on first use "
            "(UCSC-VLAA/ViT-L-14-CLIPA-datacomp1B)") in released
    assert "note: tokenizer bert-base-uncased: not cached; will download on first use" in released
    assert "336px (40% of patches masked) / 32 tokens" in released
    assert_user_error(results[-1], "--model: could not get hf-hub:clipa-test/absent",
                      "hf download clipa-test/absent")
    assert results[-1].backoff, "the Hub was never tried: the error came from an offline short cut"
    assert not list((tmp_path / "empty").rglob("*.safetensors"))


def test_unknown_names_suggest_the_closest(cli):
    assert_user_error(cli("zeroshot", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79", "--dataset", "synthetic"),
                      '--pretrained: unknown pretrained tag "laion2b_s34b_b79" for ViT-B-32; did you mean "laion2b_s34b_b79k"?')
    assert_user_error(cli("validate", "vit_l14/finetune_336_released", "init.checkpoint=ViT-L-14-CLIPA:datacomp"),
                      'init.checkpoint: unknown pretrained tag "datacomp" for ViT-L-14-CLIPA; did you mean "datacomp1b"?')
    assert_user_error(cli("validate", "vit_l14/finetune_336_released", "init.checkpoint=ViT-L-41-CLIPA:datacomp1b"),
                      'init.checkpoint: unknown architecture "ViT-L-41-CLIPA"', 'did you mean "ViT-L-14-CLIPA"?')
    assert_user_error(cli("validate", "lit/vit_b16_locked", "model.image_init=timm:vit_base_patch16_224.augreg_in22k"),
                      'model.image_init: unknown pretrained tag "augreg_in22k" for timm model vit_base_patch16_224; '
                      'did you mean "augreg_in21k"?')
    assert_user_error(cli("validate", "lit/vit_b16_locked", "model.image_init=timm:vit_large_patch16_224.augreg_in21k"),
                      "model.image_init: timm:vit_large_patch16_224.augreg_in21k holds timm vit_large_patch16_224 "
                      "weights, but the image tower is timm vit_base_patch16_224")
    assert_user_error(cli("zeroshot", "--model", "hf-hub:just-a-name", "--dataset", "synthetic"),
                      "--model: hf-hub:just-a-name is not a Hugging Face model id; write hf-hub:ORG/NAME")
    assert_user_error(cli("zeroshot", "--model", "clipa-tiny", "--pretrained", "openai", "--dataset", "synthetic"),
                      "--pretrained: clipa-tiny has no published weights in open_clip")
    assert_user_error(cli("validate", "tiny/finetune", "model.arch=ViT-B-32", "init.checkpoint=ViT-B-32:openai"),
                      'init.checkpoint: ViT-B-32:openai was trained with QuickGELU', 'model.arch = "ViT-B-32-quickgelu"')


@pytest.mark.slow  # trains two tiny stages and runs the CLI in fresh processes
def test_open_clip_train_checkpoint_with_a_model_config_json(world, tmp_path, cli):
    """`--model my_arch.json --pretrained epoch_N.pt`: the state_dict of an open_clip_train checkpoint
    ("module." prefixes from DDP), read weights-only; a pickle that would run code is refused."""
    config = json.loads((world["export"] / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "my_arch.json").write_text(json.dumps(config))
    weights = load_file(str(world["export"] / "open_clip_model.safetensors"))
    torch.save({"epoch": 32, "name": "my-run", "state_dict": {f"module.{k}": v for k, v in weights.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, tmp_path / "epoch_32.pt")
    result = cli(*zeroshot_args(world, tmp_path / "my_arch.json", "train_ckpt.json", "--pretrained", tmp_path / "epoch_32.pt"))
    assert result.returncode == 0, result.stderr
    assert cli(*zeroshot_args(world, f"local-dir:{world['export']}", "export.json")).returncode == 0
    assert metrics(world["tmp"] / "train_ckpt.json") == metrics(world["tmp"] / "export.json")

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state_dict": {"x": Exploit()}}, tmp_path / "evil.pt")
    assert_user_error(cli(*zeroshot_args(world, tmp_path / "my_arch.json", "evil.json", "--pretrained", tmp_path / "evil.pt")),
                      "evil.pt: refused to load: it holds more than tensors and plain values (it asks for ")
    assert not marker.exists()
    assert_user_error(cli("zeroshot", "--model", tmp_path / "my_arch.json", "--dataset", "synthetic"),
                      "is a model config; give its weights with --pretrained FILE")


@pytest.mark.slow  # trains two tiny stages and runs the CLI in fresh processes
def test_export_writes_a_model_card_for_every_stage(world):
    card = (world["export"] / "README.md").read_text()
    assert "library_name: open_clip" in card and "# tiny-finetune" in card
    assert "architecture: `clipa-tiny`" in card
    assert "| pretrain `tiny-pretrain` | 32 px (resize) | 8 tokens (truncate) | 32 | 192 of 192 |" in card
    assert "| finetune `tiny-finetune` | 64 px (random, 0.3 of patches masked) | 32 tokens (truncate) | 32 | 192 of 192 |" in card
    assert "Samples seen in all: 384." in card and "Started from random initialisation." in card
    final_loss = [json.loads(line) for line in (world["tmp"] / "runs" / "ft" / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line][-1]["loss"]
    assert f"| loss | {final_loss:.4f} |" in card
    assert f'open_clip.create_model_and_transforms("local-dir:{world["export"]}")' in card
    assert 'open_clip.create_model_and_transforms("hf-hub:ORG/NAME")' in card
    # the card's own instructions work: plain open_clip loads the folder
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{world['export']}")
    assert model.visual.image_size == (64, 64)
