"""The recipe's `[eval]` during training: zero-shot and retrieval on the current weights, on every process,
every `eval.every_steps` and once more at the end of the stage."""

from __future__ import annotations

from clipa.model.build import build_tokenizer, create_model
from clipa.recipe.schema import image_mean_std


class Evaluator:
    """Decides when the run evaluates (`due`) and does it (`__call__`), leaving the training model as it found it."""

    def __init__(self, recipe, stage: str, numbers, run_dir, parallel, model, masker):
        self.recipe, self.stage, self.numbers, self.run_dir = recipe, stage, numbers, run_dir
        self.parallel, self.model, self.masker = parallel, model, masker

    @property
    def enabled(self) -> bool:
        return bool(self.recipe.eval.zeroshot or self.recipe.eval.retrieval)

    def due(self, step: int) -> bool:
        """A periodic evaluation after `step`: every `eval.every_steps`, before the last step (the stage's end
        evaluates after its export)."""
        every = self.recipe.eval.every_steps
        return self.enabled and bool(every) and step % every == 0 and step < self.numbers.steps

    def __call__(self, log, step: int) -> dict:
        """The recipe's `[eval]` zero-shot and retrieval datasets on the current weights, on every process."""
        from clipa.evaluate.models import LoadedModel
        from clipa.evaluate.retrieval import retrieval
        from clipa.evaluate.zeroshot import zeroshot

        recipe, geometry = self.recipe, self.numbers.geometry
        model = self.parallel.evaluation_model(lambda: create_model(self.numbers.model_cfg))
        loaded = LoadedModel(model, build_tokenizer(recipe.model.arch, geometry.context_length),
                             geometry.image_size, *image_mean_std(recipe.data), recipe.model.arch,
                             str(self.run_dir), interpolation=recipe.data.augment.interpolation)
        row = {"step": step, "samples": step * self.numbers.global_batch, "stage": self.stage}
        masker_was = self.masker.keep if self.masker else None
        for name in recipe.eval.zeroshot:
            result = zeroshot(loaded, name, recipe.eval.data_root or None)
            for metric in ("acc1", "acc5", "mean_per_class_recall"):
                row[f"zeroshot/{name}/{metric}"] = result["metrics"][metric]
            log.message(f"step {step}: zero-shot {name} acc1 {result['metrics']['acc1']:.4f} "
                        f"acc5 {result['metrics']['acc5']:.4f}")
        for name in recipe.eval.retrieval:
            result = retrieval(loaded, name, recipe.eval.retrieval_data_root or None)
            recalls = {k: v for k, v in result["metrics"].items() if "recall@" in k}
            row.update({f"retrieval/{name}/{k}": v for k, v in recalls.items()})
            log.message(f"step {step}: retrieval {name} image R@1 {recalls['image_retrieval_recall@1']:.4f} "
                        f"text R@1 {recalls['text_retrieval_recall@1']:.4f}")
        log.write(row)
        self.model.train()
        if self.masker:
            self.masker.use(masker_was)
        return row
