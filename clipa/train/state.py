"""The counters a run carries across steps and resumes, in one place with state_dict/load_state_dict."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (a skipped non-finite step counts: data and schedule move on)
    wall_before: float = 0.0  # seconds trained by earlier sessions of this run (cost survives resumes)
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient, over the whole run
    nonfinite_in_row: int = 0  # the current streak; not saved (a checkpoint is never written inside one)

    def state_dict(self, elapsed: float) -> dict:
        """What a checkpoint keeps; `elapsed` is this session's training time so far."""
        return {"step": self.step, "wall_time_s": self.wall_before + elapsed, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.wall_before = state["step"], state.get("wall_time_s", 0.0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.nonfinite_in_row = 0

    def finished(self, finite: bool) -> None:
        """Count one optimizer step, finite (updated) or not (skipped)."""
        self.step += 1
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        self.skipped_steps += 0 if finite else 1
