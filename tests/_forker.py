"""A fork server for tests that run the CLI many times: a fresh interpreter that imports torch and
potstill once and then, per request, forks a child that runs ``potstill.cli.main(argv)`` — a real
process, at no import cost — and, with ``kill_after``, kills it with SIGKILL after that many
seconds unless it has finished. The server itself never runs a torch operation, so no thread pool
exists when it forks.

Protocol: one JSON object per line on stdin, ``{"argv": [...], "kill_after": s | null,
"cwd": dir | null}``; one per line on stdout, ``{"killed": bool, "code": int, "seconds": float,
"stdout": str, "stderr": str}`` (what the child printed, up to 50,000 characters each).
"""

import json
import os
import signal
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

import potstill.cache
import potstill.cli
import potstill.generate
import potstill.generation.hf
import potstill.methods
import potstill.prepare
import potstill.train

LOGS = ""  # the server's folder for its children's output (set when it starts)


def run(argv: list[str], kill_after: float | None, cwd: str | None = None) -> dict:
    started = time.perf_counter()
    logs = [os.path.join(LOGS, f"{time.time_ns()}.{name}") for name in ("out", "err")]
    pid = os.fork()
    if pid == 0:  # the child
        for fd, path in zip((1, 2), logs, strict=True):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        try:
            if cwd:
                os.chdir(cwd)
            torch.set_num_threads(1)
            code = potstill.cli.main(argv)
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            code = 99
        os._exit(code)
    killed = False
    status = None
    if kill_after is not None:
        deadline = started + kill_after
        while time.perf_counter() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            status = None
            time.sleep(0.002)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            killed = True
    if status is None:
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    out, err = (_read(path) for path in logs)
    return {
        "killed": killed and code == -signal.SIGKILL,
        "code": code,
        "seconds": time.perf_counter() - started,
        "stdout": out,
        "stderr": err,
    }


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()[-50_000:]
    except FileNotFoundError:  # killed before it opened the file
        return ""
    os.unlink(path)
    return text


class Forker:
    """The client: starts a fork server (``python tests/_forker.py``) and sends it requests."""

    def __init__(self, cwd: str | os.PathLike):
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd,
        )  # fmt: skip

    def run(self, argv: list[str], kill_after: float | None = None, cwd: str | None = None) -> dict:
        request = {"argv": argv, "kill_after": kill_after, "cwd": cwd}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    LOGS = tempfile.mkdtemp(prefix="forker-")
    for line in sys.stdin:
        request = json.loads(line)
        result = run(request["argv"], request.get("kill_after"), request.get("cwd"))
        print(json.dumps(result), flush=True)
