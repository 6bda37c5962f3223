"""After a run, without torch: a run's report (report), the points of a scaling fit read from runs or JSON (points),
the power-law fit (fit), and every chart clipa draws (plot)."""
