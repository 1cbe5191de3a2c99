"""`python -m lcsm.cli ARGS` with rank 1 raising in its second training step: a fault injected by
tests/parallel/test_parallel.py (run under torchrun) to check that one failing rank ends the run."""

import os
import runpy

from lcsm.run import trainer

if os.environ.get("RANK") == "1":
    step = trainer.Trainer.step

    def failing(self, *args, **kwargs):
        if self.steps_done == 1:
            raise RuntimeError("injected failure on rank 1")
        return step(self, *args, **kwargs)

    trainer.Trainer.step = failing

runpy.run_module("lcsm.cli", run_name="__main__", alter_sys=True)
