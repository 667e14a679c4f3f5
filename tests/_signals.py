"""The CLI behind a prelude for signal tests: it (1) restores Python's SIGINT handler — a process
started in the background of a non-interactive shell inherits SIGINT ignored, and an interrupt
test would then prove nothing — and (2) appends one line to the file ``$MARKER`` per call of a
method's ``loss`` and pauses at call ``$PAUSE_AT``, where the test sends its signal: a real
signal, in a known place."""


def loss_marker_prelude(module: str, cls: str) -> str:
    """Python source to run with ``python -c SOURCE ARGV…`` (``cls`` of ``module`` is patched)."""
    return f"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from {module} import {cls} as Patched
marker, pause_at = os.environ["MARKER"], int(os.environ.get("PAUSE_AT", "0"))
original, calls = Patched.loss, [0]
def loss(self, *args, **kwargs):
    calls[0] += 1
    with open(marker, "a") as f:
        f.write(f"{{calls[0]}}\\n")
    if calls[0] == pause_at:
        time.sleep(120)
    return original(self, *args, **kwargs)
Patched.loss = loss
from potstill.cli import main
sys.exit(main(sys.argv[1:]))
"""
