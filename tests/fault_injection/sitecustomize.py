"""A real crash in a real rank, for the fault tests: with IDIFF_TEST_CRASH="RANK:STEP" in the environment (and this
folder on PYTHONPATH), the rank RANK of every job raises once it noted progress at STEP, whatever launcher
started it (--nproc, mpiexec, srun). Python imports ``sitecustomize`` at start-up; without the variable it does
nothing."""

import os

_WHERE = os.environ.get("IDIFF_TEST_CRASH")

if _WHERE:
    from idiff.launch import hooks as _hooks

    _rank, _step = map(int, _WHERE.split(":"))
    _note = _hooks.JobHooks.progress

    def _progress(self, step):
        _note(self, step)
        if self.env.rank == _rank and step == _step:
            raise RuntimeError(f"injected fault at step {step}")

    _hooks.JobHooks.progress = _progress
