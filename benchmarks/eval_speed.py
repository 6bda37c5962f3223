"""Zero-shot evaluation throughput (images/s) on this machine, for the tiny model and ViT-B-16.

    python benchmarks/eval_speed.py [--arch clipa-tiny --arch ViT-B-16] [--per-class 10]

Random weights (speed does not depend on them), the built-in synthetic set (24 classes x
--per-class images) at each model's native resolution, batch 64, one process. Reports the
time to build the classifier (text side) and the images/s of the image side.
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch

from clipa.data.transforms import eval_transform
from clipa.evaluate.datasets import load_zeroshot_data
from clipa.evaluate.zeroshot import classify
from clipa.model.build import arch_config, build_tokenizer, create_model, native_geometry, stage_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", action="append")
    parser.add_argument("--per-class", type=int, default=10)
    args = parser.parse_args()
    print(f"{'arch':<12} {'image px':>8} {'images':>7} {'classifier s':>13} {'images/s':>9}")
    for arch in args.arch or ["clipa-tiny", "ViT-B-16"]:
        geometry = native_geometry(arch_config(arch))
        model = create_model(stage_config(arch, geometry)).eval()
        tokenizer = build_tokenizer(arch, geometry.context_length)
        data = load_zeroshot_data("synthetic", eval_transform(geometry.image_size), synthetic_per_class=args.per_class)
        start = time.perf_counter()
        with torch.no_grad():
            open_clip.build_zero_shot_classifier(model, tokenizer, data.classnames, data.templates)
        classifier_s = time.perf_counter() - start
        metrics = classify(model, tokenizer, data, batch_size=64)
        print(f"{arch:<12} {geometry.image_size:>8} {metrics['num_samples']:>7} {classifier_s:>13.2f} "
              f"{metrics['images_per_s']:>9.1f}")


if __name__ == "__main__":
    main()
