"""A ``python -c`` program that runs the recadapt CLI and SIGKILLs itself in the middle of writing a checkpoint,
the ``$RECADAPT_TEST_KILL_NTH``-th time it gets there (counting from 1):

- ``RECADAPT_TEST_KILL_IN=write``: while the checkpoint's files go into its temporary folder (at ``optimizer.pt``);
- ``RECADAPT_TEST_KILL_IN=rename``: on a file system without an atomic directory exchange, after the old
  ``checkpoint/`` was renamed aside and before the new one took its place (the moment no ``checkpoint/`` exists).
"""

KILL_IN_CHECKPOINT = """
import os, signal, sys
import torch
import recadapt.io as io

where, nth = os.environ["RECADAPT_TEST_KILL_IN"], int(os.environ["RECADAPT_TEST_KILL_NTH"])
calls = [0]

def count_and_maybe_die():
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

if where == "write":
    save = torch.save
    def save_then_die(obj, f, *args, **kwargs):
        if os.path.basename(str(f)) == "optimizer.pt":
            count_and_maybe_die()
        return save(obj, f, *args, **kwargs)
    torch.save = save_then_die
else:
    io._exchange = lambda a, b: False
    replace = os.replace
    def replace_then_die(src, dst):
        replace(src, dst)
        if os.path.basename(str(src)) == "checkpoint" and ".checkpoint.old-" in str(dst):
            count_and_maybe_die()
    os.replace = replace_then_die

from recadapt.cli import main
sys.exit(main(sys.argv[1:]))
"""
