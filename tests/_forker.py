"""A fork server for kill -9 tests: a fresh interpreter that imports torch and potstill once and
then, per request, forks a child that runs ``potstill.cli.main(argv)`` and kills it with SIGKILL
after ``kill_after`` seconds (or lets it finish). The server itself never runs a torch operation,
so no thread pool exists when it forks; each child is a real process killed by a real signal, at
no import cost.

Protocol: one JSON object per line on stdin, ``{"argv": [...], "kill_after": s | null}``; one per
line on stdout, ``{"killed": bool, "code": int | null, "seconds": float}``.
"""

import json
import os
import signal
import sys
import time

import torch  # noqa: F401 - everything a child needs is imported once, before any fork
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

import potstill.cache
import potstill.cli
import potstill.generate
import potstill.generation.hf
import potstill.methods
import potstill.prepare
import potstill.train


def run(argv: list[str], kill_after: float | None) -> dict:
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            import torch as child_torch

            child_torch.set_num_threads(1)
            code = potstill.cli.main(argv)
        except BaseException:
            code = 99
        os._exit(code)
    killed = False
    if kill_after is not None:
        deadline = started + kill_after
        while time.perf_counter() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return {"killed": False, "code": os.waitstatus_to_exitcode(status),
                        "seconds": time.perf_counter() - started}  # fmt: skip
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        killed = True
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {
        "killed": killed and code == -signal.SIGKILL,
        "code": code,
        "seconds": time.perf_counter() - started,
    }


if __name__ == "__main__":
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(run(request["argv"], request.get("kill_after"))), flush=True)
