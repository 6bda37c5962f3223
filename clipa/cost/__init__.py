"""What training costs, before and while it runs, without torch at import: FLOPs per sample counted from the
model config (flops), accelerator peaks (accelerators), and a pipeline's tokens, FLOPs, hours and dollars (plan)."""
