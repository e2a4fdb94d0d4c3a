"""A ``python -c`` program that runs the recadapt CLI and SIGKILLs itself when the run logs optimizer step
``$RECADAPT_TEST_KILL_AT_STEP``: how the resume tests interrupt a training run at a known point."""

KILLER = """
import os, signal, sys
from recadapt.train.logger import RunLogger

kill_at = int(os.environ["RECADAPT_TEST_KILL_AT_STEP"])
log = RunLogger.log

def log_then_die(self, step, values):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    log(self, step, values)

RunLogger.log = log_then_die
from recadapt.cli import main
sys.exit(main(sys.argv[1:]))
"""
