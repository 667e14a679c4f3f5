"""Fused distillation loss: time and memory of forward+backward against the anchors.

Each (implementation, N, V, dtype) runs in its own process so peak RSS is its own:
seconds = best of --repeats (3) forward+backward after one warm-up (one run when the warm-up took
over --slow-seconds); extra RSS = peak RSS (VmHWM, reset after the warm-up so compilation does not
count) minus the RSS just before the timed runs: the memory a training step's loss needs on top of
its inputs, including the gradients it returns. Workload: generalized JSD, β=0.5, T=1, H=576,
every label valid (no ignored positions to skip) unless --masked says otherwise.

Implementations:
  naive            full [N, V] logits in PyTorch, potstill.losses.distillation_loss, autograd
  liger            Liger-Kernel LigerFusedLinearJSDLoss (chunked, torch), uncompiled
  liger_compiled   the same with compiled=True
  trl              TRL ChunkedDivergenceFunction (the GKD/distillation trainer's chunked kernel)
  potstill         potstill.losses.fused_distill_loss
  potstill_compiled  the same with compile=True
  floor            the four [N, V, H] matmuls alone (both projections, dL/dh, dL/dW), in
                   1,024-row blocks: the time no implementation can beat

    python benchmarks/fused_loss.py                  # the full grid (slow: ~1 h on 2 cores)
    python benchmarks/fused_loss.py --n 4096 --v 49152
    pip install -e '.[bench]'                        # Liger-Kernel and TRL, for the anchors
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

FLOOR_CHUNK = 1024  # rows per matmul block in the floor: the fastest block size measured here
IMPLS = ["floor", "potstill", "potstill_compiled", "naive", "liger", "liger_compiled", "trl"]
H = 576


def proc_kb(field: str, path: str = "/proc/self/status") -> int:
    """A ``kB`` field of a /proc file: VmRSS / VmHWM of this process, or MemAvailable."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def make_step(impl: str, n: int, v: int, dtype, masked: float):
    import torch

    g = torch.Generator().manual_seed(0)
    hs = (torch.randn(n, H, generator=g)).to(dtype).requires_grad_()
    ws = (torch.randn(v, H, generator=g) * H**-0.5 * 2).to(dtype).requires_grad_()
    ht = torch.randn(n, H, generator=g).to(dtype)
    wt = (torch.randn(v, H, generator=g) * H**-0.5 * 2).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if masked:
        labels[torch.rand(n, generator=g) < masked] = -100

    if impl == "naive":
        from potstill.losses import distillation_loss

        def step():
            s = hs @ ws.T  # (N, V)
            with torch.no_grad():
                t = ht @ wt.T
            loss, _ = distillation_loss(s, t, labels, kind="jsd", beta=0.5)
            loss.backward()
            return loss

    elif impl.startswith("potstill"):
        from potstill.losses.fused import fused_distill_loss

        def step():
            loss = fused_distill_loss(
                hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, kind="jsd", beta=0.5,
                compile=impl.endswith("compiled"),
            )  # fmt: skip
            loss.backward()
            return loss

    elif impl.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=0.5,
            temperature=1.0,
            compiled=impl.endswith("compiled"),
        )

        def step():
            loss = fn(hs, ws, ht, wt, labels)
            loss.backward()
            return loss

    elif impl == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        valid = labels != -100

        def step():
            per_token, _ = ChunkedDivergenceFunction.apply(
                hs[valid], ws, None, ht[valid], wt, None, 0.5, 1.0
            )
            loss = per_token.sum() / valid.sum().clamp(min=1)
            loss.backward()
            return loss

    elif impl == "floor":
        rows = (labels != -100).nonzero().squeeze(1)

        def step():
            with torch.no_grad():
                w_s, w_t = ws.T, wt.T  # (H, V) views
                s = torch.empty(FLOOR_CHUNK, v, dtype=dtype)
                t = torch.empty(FLOOR_CHUNK, v, dtype=dtype)
                gw = torch.zeros(v, H, dtype=dtype)
                for start in range(0, rows.numel(), FLOOR_CHUNK):
                    idx = rows[start : start + FLOOR_CHUNK]
                    h = hs[idx]
                    torch.mm(h, w_s, out=s[: idx.numel()])  # student projection
                    torch.mm(ht[idx], w_t, out=t[: idx.numel()])  # teacher projection
                    _ = s[: idx.numel()] @ ws  # dL/dh
                    gw.addmm_(s[: idx.numel()].T, h)  # dL/dW
            return torch.tensor(float("nan"))

    else:
        raise SystemExit(f"unknown implementation {impl}")

    def run():
        hs.grad = ws.grad = None
        return step()

    return run, (hs, ws)


def worker(
    impl: str, n: int, v: int, dtype_name: str, masked: float, repeats: int, slow_seconds: float
) -> dict:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if impl == "naive":  # full logits, log-probs and their gradients: ~6 fp32 copies of [N, V]
        need_gb = 6 * n * v * 4 / 2**30
        avail_gb = proc_kb("MemAvailable", "/proc/meminfo") / 2**20
        if need_gb > 0.8 * avail_gb:
            return {"error": f"skipped: needs ~{need_gb:.0f} GB, {avail_gb:.0f} GB available"}
    try:
        run, leaves = make_step(impl, n, v, dtype, masked)
    except ImportError as e:
        return {"error": f"not installed ({e.name}): pip install -e '.[bench]'"}
    t0 = time.perf_counter()
    run()  # warm-up (and compilation: its memory is not the loss's)
    warmup = time.perf_counter() - t0
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    base = proc_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    times, loss = [], None
    # Slow implementations on big shapes are timed once: their figure is far from the floor anyway.
    for _ in range(repeats if warmup < slow_seconds else 1):
        t0 = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - t0)
    return {
        "seconds": min(times),
        "extra_rss_mb": (proc_kb("VmHWM") - base) / 1024,
        "loss": float(loss),
        "runs": len(times),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, nargs="*", default=[1024, 4096, 8192])
    p.add_argument("--v", type=int, nargs="*", default=[49152, 151936])
    p.add_argument("--dtype", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--impl", nargs="*", default=IMPLS, choices=IMPLS)
    p.add_argument(
        "--masked", type=float, default=0.0, help="fraction of labels set to ignore_index"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (best)")
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=60.0,
        help="an implementation whose warm-up takes longer is timed once",
    )
    p.add_argument("--worker", nargs=4, metavar=("IMPL", "N", "V", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    if args.worker:
        impl, n, v, dt = args.worker
        print(
            json.dumps(
                worker(impl, int(n), int(v), dt, args.masked, args.repeats, args.slow_seconds)
            )
        )
        return
    results = []
    print(
        "| N | V | dtype | implementation | seconds (fwd+bwd) | × floor | extra peak RSS (MB) | loss |"
    )
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    for n in args.n:
        for v in args.v:
            for dt in args.dtype:
                floor = None
                for impl in args.impl:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--worker",
                        impl,
                        str(n),
                        str(v),
                        dt,
                        "--masked",
                        str(args.masked),
                        "--repeats",
                        str(args.repeats),
                        "--slow-seconds",
                        str(args.slow_seconds),
                    ]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    try:
                        r = json.loads(proc.stdout.strip().splitlines()[-1])
                    except (IndexError, json.JSONDecodeError):
                        r = {"error": (proc.stderr.strip().splitlines() or ["crashed"])[-1][:120]}
                    r.update(impl=impl, n=n, v=v, dtype=dt)
                    results.append(r)
                    if "error" in r:
                        print(f"| {n} | {v} | {dt} | {impl} | {r['error']} | | | |", flush=True)
                        continue
                    if impl == "floor":
                        floor = r["seconds"]
                    ratio = f"{r['seconds'] / floor:.2f}" if floor else ""
                    loss = "" if r["loss"] != r["loss"] else f"{r['loss']:.5f}"
                    once = " (1 run)" if r["runs"] == 1 and args.repeats > 1 else ""
                    print(
                        f"| {n} | {v} | {dt} | {impl} | {r['seconds']:.2f}{once} | {ratio} | {r['extra_rss_mb']:.0f} | {loss} |",
                        flush=True,
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
