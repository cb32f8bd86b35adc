"""Non-finite steps: skipped one by one, and the run stopped when too many come in a row."""

import torch

from ..errors import RunFailed


class NonfiniteSteps:
    """Counts steps whose gradients were inf/NaN, on the device: no host sync at each step.

    The counts are read at log rows only; ``limit`` steps in a row there stop the run. The total goes into
    the log and the checkpoint.
    """

    def __init__(self, limit: int, device):
        self.limit = limit
        self.counts = torch.zeros(2, dtype=torch.long, device=device)  # [in a row, total]

    def record(self, finite: torch.Tensor) -> None:
        self.counts[0] = (self.counts[0] + 1) * (~finite)
        self.counts[1] += (~finite).long()

    def check(self, *, step: int, last_good) -> int:
        """The total so far; raises RunFailed after ``limit`` in a row. ``last_good()``: the manifest of the
        newest complete checkpoint, for the message."""
        in_a_row, total = self.counts.tolist()
        if in_a_row >= self.limit:
            raise RunFailed(
                f"training stopped at step {step}: {in_a_row} non-finite steps in a row (loss or gradients inf/NaN). "
                f"The run dir keeps its last good checkpoint ({last_good() or 'none was written'}); lower train.lr, "
                f"use precision bf16, or check the data.")
        return total

    def state_dict(self) -> dict:
        return {"nonfinite_steps": int(self.counts[1])}

    def load_state_dict(self, state: dict) -> None:
        self.counts[1] = state["nonfinite_steps"]
