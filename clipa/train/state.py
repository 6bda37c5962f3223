"""The counters a run carries across steps and resumes, in one place with state_dict/load_state_dict."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class TrainState:
    global_batch: int = 0  # samples per step: the checkpoint records the samples seen
    step: int = 0  # optimizer steps done (a skipped non-finite step counts: data and schedule move on)
    wall_before: float = 0.0  # seconds trained by earlier sessions of this run (cost survives resumes)
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient, over the whole run
    nonfinite_in_row: int = 0  # the current streak; not saved (a checkpoint is never written inside one)
    started: float = field(default_factory=time.perf_counter)  # when this session's training began
    stopped: float | None = None  # when it ended: the last checkpoint and the result count the same time

    def start_clock(self) -> None:
        self.started, self.stopped = time.perf_counter(), None

    def stop_clock(self) -> None:
        self.stopped = time.perf_counter()

    def elapsed(self) -> float:
        """This session's training time so far (up to `stop_clock`, once called)."""
        return (self.stopped if self.stopped is not None else time.perf_counter()) - self.started

    def state_dict(self) -> dict:
        """What a checkpoint keeps (the top level of state.pt)."""
        return {"step": self.step, "wall_time_s": self.wall_before + self.elapsed(), "skipped_steps": self.skipped_steps,
                "samples": self.step * self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.wall_before = state["step"], state.get("wall_time_s", 0.0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.nonfinite_in_row = 0

    def finished(self, finite: bool) -> None:
        """Count one optimizer step, finite (updated) or not (skipped)."""
        self.step += 1
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        self.skipped_steps += 0 if finite else 1
