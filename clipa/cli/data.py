"""`clipa data synth` and `clipa data inspect`: write and inspect datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from clipa.cli.render import inspect_table, line, out, user_errors
from clipa.errors import ClipaError


@user_errors
def synth(out_dir: Path = typer.Argument(..., metavar="OUT", help="Output folder."),
          num_samples: int = typer.Option(10_000, "--num-samples"),
          shard_size: int = typer.Option(1_000, "--shard-size"),
          image_size: int = typer.Option(64, "--image-size"),
          eval_per_class: int = typer.Option(20, "--eval-per-class"),
          seed: int = typer.Option(0, "--seed")) -> None:
    """Write the synthetic data as webdataset shards plus an ImageFolder zero-shot split."""
    from clipa.data.shards import write_synthetic
    from clipa.data.synthetic import CLASSNAMES
    from clipa.progress import progress_counter

    total = num_samples + eval_per_class * len(CLASSNAMES)
    with progress_counter("writing", total) as advance:
        info = write_synthetic(out_dir, num_samples, shard_size, image_size, eval_per_class, seed, progress=advance)
    out.print(f"wrote {info['samples']} training pairs in {info['shards']} shards: data.train = \"{info['train']}\"\n"
              f"wrote {info['eval_images']} zero-shot images: --dataset imagefolder --data-root {info['eval']}",
              highlight=False)


@user_errors
def inspect(path: str = typer.Argument(..., metavar="PATH",
                                       help='Shards ("/data/{00000..00099}.tar"), a .csv/.tsv, "synthetic", '
                                            'or any data.train string.'),
            max_samples: int = typer.Option(0, "--max-samples", help="Stop each source after this many good "
                                            "samples (0 = read everything; synthetic: 256)."),
            sheet: Path = typer.Option(Path("contact_sheet.png"), "--sheet", help="PNG contact sheet to write."),
            sheet_count: int = typer.Option(16, "--sheet-count", help="Images on the sheet (0 = no sheet)."),
            caption_key: str = typer.Option("txt", "--caption-key", help='Shard caption: "txt" or "json:FIELD".'),
            csv_image_key: str = typer.Option("filepath", "--csv-image-key"),
            csv_caption_key: str = typer.Option("title", "--csv-caption-key"),
            csv_separator: str = typer.Option("", "--csv-separator", help='"" = tab for .tsv, comma otherwise.'),
            ) -> None:
    """Sample count, caption lengths, corrupt samples and a contact sheet of a dataset."""
    from clipa.data.inspect import inspect_dataset, summary_rows
    from clipa.data.sources import ReadOptions

    if max_samples < 0 or sheet_count < 0:
        raise ClipaError("--max-samples and --sheet-count: must be >= 0")
    options = ReadOptions(caption_key, csv_image_key, csv_caption_key, csv_separator)
    from clipa.data.spec import data_commands

    for command in data_commands(path, key="PATH"):  # PATH can run commands, as data.train can: say so first
        line(f"PATH runs: {command}")
    summary = inspect_dataset(path, options, max_samples, sheet if sheet_count else None, sheet_count)
    out.print(inspect_table(path, summary_rows(summary)))
