"""`clipa zeroshot`, `retrieval` and `linear-probe`: one set of shared options, one way to load the model."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import List, Optional

import typer

from clipa.cli.render import line, out, retrieval_table, user_errors, zeroshot_table
from clipa.errors import ClipaError, check_one_of

# Options shared by the evaluation commands: --model, a command's --dataset and --data-root, --pretrained, the
# command's other options, then the rest of these.
_MODEL = typer.Option(None, "--model", help="Run dir, exported model dir, local-dir:PATH, hf-hub:ORG/NAME, ARCH:TAG, or an "
                      "architecture / model-config JSON with --pretrained. Default: the newest finished run under "
                      "runs/ (a finetune before a pretraining run).")
_SHARED = {
    "pretrained": (Optional[str], typer.Option(None, "--pretrained", help="Weights for an architecture: a published tag "
                                               "(clipa models ARCH) or a weights file (e.g. an open_clip_train epoch_N.pt).")),
    "image_size": (Optional[int], typer.Option(None, "--image-size", help="Evaluate at this resolution (the image "
                                               "position embedding is resized, as finetuning does).")),
    "text_length": (Optional[int], typer.Option(None, "--text-length", help="Tokens per prompt/caption (the text "
                                                "position embedding is resized; the tokenizer truncates to it).")),
    "batch_size": (int, typer.Option(256, "--batch-size", help="Images per batch in each process.")),
    "num_workers": (Optional[int], typer.Option(None, "--num-workers", min=0, help="Image-decoding worker processes per "
                                                "evaluating process (0 = decode in the main process; default: this "
                                                "process's share of the cores minus one, at most 4).")),
    "precision": (Optional[str], typer.Option(None, "--precision", help="fp32 | bf16 | fp16 | amp (autocast; amp is "
                                              "fp16 on a GPU, bf16 on a CPU). Default: amp on a GPU, fp32 on a CPU.")),
    "output": (Optional[Path], typer.Option(None, "--output", help="Write results as JSON (CLIP_benchmark shape), one "
                                            "object per file; {dataset} in the name is replaced by the dataset name "
                                            "(several datasets without it: NAME_DATASET.json next to NAME.json).")),
}


def _evaluation(*, without: tuple[str, ...] = ()):
    """A command taking `model`, its own options and `**shared`: typer is shown the shared options (less
    `without`) among the command's own, so they are written once for every command."""

    def build(fn):
        signature = inspect.signature(fn)
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD  # typer passes every option by name
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        shared = [inspect.Parameter(name, kind, default=option, annotation=annotation)
                  for name, (annotation, option) in _SHARED.items() if name not in without]
        at = [p.name for p in own].index("data_root") + 1  # --pretrained follows --data-root, as it always did
        fn.__signature__ = signature.replace(parameters=[*own[:at], *shared[:1], *own[at:], *shared[1:]])
        return user_errors(fn)

    return build


def _eval_model(model: Optional[str], pretrained: Optional[str], image_size: Optional[int] = None,
                text_length: Optional[int] = None, batch_size: int = 1, precision: Optional[str] = None, **_):
    """Join the launcher's process group (torchrun / accelerate launch; none for a plain call) and
    load the model onto its device (without --model: the newest finished run, said on the first line).
    Returns (model, whether this process prints and writes, the precision's name, its autocast context)."""
    from clipa.evaluate.precision import autocast, resolve

    for option, value, least in (("--batch-size", batch_size, 1), ("--image-size", image_size, 1),
                                 ("--text-length", text_length, 2)):
        if value is not None and value < least:
            raise ClipaError(f"{option}: must be >= {least}, got {value}")
    if precision is not None:
        resolve(precision, "cpu")  # a bad name fails before the model loads
    if model is None:
        from clipa.run.listing import run_to_evaluate

        if pretrained:
            raise ClipaError("--pretrained: needs --model (the architecture the weights are for)")
        run = run_to_evaluate()
        line(f"model: {run.path} (newest finished {run.stage} run; choose another with --model)")
        model = str(run.path)
    from clipa.evaluate.models import load_model  # open_clip: slow to import, so after the checks above
    from clipa.evaluate.sharding import join_launcher

    accelerator = join_launcher()
    loaded = load_model(model, pretrained, image_size, text_length)
    loaded.model.to(accelerator.device)
    precision = resolve(precision, accelerator.device)
    return loaded, accelerator.is_main_process, precision, autocast(precision, accelerator.device)


def _decode_workers(num_workers: Optional[int]) -> int:
    from clipa.data.loader import resolve_workers

    return min(4, resolve_workers(-1)) if num_workers is None else num_workers


def _write_outputs(results: list[dict], output: Optional[Path]) -> None:
    from clipa.evaluate.zeroshot import output_paths, write_result

    if output:
        for result, path in zip(results, output_paths(output, [r["dataset"] for r in results])):
            write_result(result, path)
            out.print(f"wrote {path}", highlight=False)


@_evaluation()
def zeroshot(model: Optional[str] = _MODEL,
             dataset: List[str] = typer.Option(..., "--dataset", help="imagenet | imagenet-v2 | imagenet-sketch | "
                                               "imagenet-r | imagenet-a | imagefolder | wds | synthetic, or "
                                               "CLIP_benchmark's names: imagenet1k, imagenetv2, imagenet_sketch, "
                                               "wds/NAME (repeat for several)."),
             data_root: Optional[str] = typer.Option(None, "--data-root", help="Dataset folder (all but synthetic); "
                                                     "{dataset} in it stands for each dataset's name. Default: "
                                                     "$CLIPA_DATA/<dataset> (imagenet/, imagenet-v2/, wds_NAME/, ...)."),
             templates: Optional[str] = typer.Option(None, "--templates",
                                                     help="openai | simple | FILE (one {c} template per line)."),
             **shared) -> None:
    """Zero-shot classification: acc1, acc5, mean per-class recall (split over torchrun/accelerate processes)."""
    from clipa.evaluate.names import data_root as find_data_root

    for name in dataset:
        find_data_root(name, data_root)  # an unknown name or a missing folder fails before the model loads
    repeated = sorted({name for name in dataset if dataset.count(name) > 1})
    if repeated:
        raise ClipaError(f"--dataset: {repeated[0]} is given more than once; list each dataset once")
    loaded, main, precision, in_precision = _eval_model(model, **shared)
    from clipa.evaluate.zeroshot import zeroshot as run_zeroshot

    workers = _decode_workers(shared["num_workers"])
    with in_precision:
        results = [run_zeroshot(loaded, name, data_root, templates, batch_size=shared["batch_size"], num_workers=workers)
                   for name in dataset]
    for result in results:
        result["precision"] = precision
    if main:
        out.print(zeroshot_table(results))
        _write_outputs(results, shared["output"])


@_evaluation()
def retrieval(model: Optional[str] = _MODEL,
              dataset: str = typer.Option(..., "--dataset", help="csv | wds | synthetic."),
              data_root: Optional[str] = typer.Option(None, "--data-root", help="CSV/TSV file (csv) or dataset folder (wds)."),
              **shared) -> None:
    """Image <-> text retrieval: recall@1/5/10 (several captions per image supported)."""
    from clipa.recipe.schema import RETRIEVAL_DATASETS

    check_one_of(dataset, RETRIEVAL_DATASETS, "retrieval dataset")  # before the model loads
    loaded, main, precision, in_precision = _eval_model(model, **shared)
    from clipa.evaluate.retrieval import retrieval as run_retrieval

    with in_precision:
        result = run_retrieval(loaded, dataset, data_root, batch_size=shared["batch_size"],
                               num_workers=_decode_workers(shared["num_workers"]))
    result["precision"] = precision
    if not main:
        return
    out.print(retrieval_table(dataset, result["metrics"]))
    out.print(f"skipped images (unreadable): {result['metrics']['skipped_images']}", highlight=False)
    _write_outputs([result], shared["output"])


@_evaluation(without=("image_size", "text_length"))
def linear_probe(model: Optional[str] = _MODEL,
                 dataset: str = typer.Option(..., "--dataset", help="imagefolder (train/ and test/ folders) | synthetic."),
                 data_root: Optional[str] = typer.Option(None, "--data-root"),
                 cache: Optional[Path] = typer.Option(None, "--cache",
                                                      help="Feature cache folder (default .clipa-cache/features)."),
                 **shared) -> None:
    """Logistic-regression probe on frozen image features; L2 chosen on a class-stratified validation split."""
    loaded, main, precision, in_precision = _eval_model(model, **shared)
    from clipa.evaluate.linear_probe import linear_probe as run_probe

    with in_precision:
        result = run_probe(loaded, dataset, data_root, cache, batch_size=shared["batch_size"],
                           num_workers=_decode_workers(shared["num_workers"]))
    result["precision"] = precision
    if not main:
        return
    m = result["metrics"]
    out.print(f"linear probe on {dataset}: top-1 {m['acc1']:.4f} (L2 {m['l2']:g} chosen on validation; "
              f"{m['num_train']} train / {m['num_test']} test images)", highlight=False)
    _write_outputs([result], shared["output"])
