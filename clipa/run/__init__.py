"""The run directory, owned in one place and without torch: its names and layout (layout), the marker and
the lock (lock), the metrics reader (metrics), the walk back through a run's earlier stages (lineage), and the
runs under `runs/` with the one a bare `clipa finetune` / `zeroshot` takes (listing)."""
