"""The run directory, owned in one place and without torch: its names and layout (layout), the marker and
the lock (lock), the metrics reader (metrics), and the walk back through a run's earlier stages (lineage)."""
