"""PaTH attention forward time: blockwise UT-transform algorithm vs the explicit-matrix
reference, measured in one process.

    python benchmarks/path_speed.py                       # 512 and 2048 tokens
    python benchmarks/path_speed.py --lengths 256,1024 --block 32

Both compute softmax(scale * PaTH scores, causal) @ v for batch 1, float32.
After one warm-up the two run interleaved for --reps rounds and the medians
are compared; the reference is slow (O(T^2 d^2), one Python step per
token), so at lengths above --ref-once-above it is run once only (no
warm-up, no agreement check), and the output says so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mempos.encodings.path import path_attention


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ref-once-above", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"PaTH attention forward, batch 1, {args.heads} heads x {args.head_dim}, float32, "
          f"block {args.block}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        for length in (int(n) for n in args.lengths.split(",")):
            g = torch.Generator().manual_seed(0)
            shape = (1, args.heads, length, args.head_dim)
            q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
            w = F.normalize(torch.randn(shape, generator=g), dim=-1)
            beta = 2 * torch.rand(shape[:-1], generator=g)
            fast_fn = lambda: path_attention(q, k, v, w, beta, block_size=args.block)  # noqa: E731
            slow_fn = lambda: path_attention(q, k, v, w, beta, reference=True)  # noqa: E731
            once = length > args.ref_once_above
            fast_out = fast_fn()  # warm-up
            slow_out = None if once else slow_fn()
            fast_times, ref_times = [], []
            for rep in range(args.reps):  # interleaved, so machine-speed drift hits both alike
                fast_times.append(seconds(fast_fn))
                if rep == 0 or not once:
                    ref_times.append(seconds(slow_fn))
            fast, ref = statistics.median(fast_times), statistics.median(ref_times)
            agree = f", max |diff| {float((fast_out - slow_out).abs().max()):.1e}" if slow_out is not None else ""
            note = "reference timed once, no warm-up" if once else f"median of {args.reps}"
            print(f"T={length:5d}: blockwise {fast * 1e3:9.1f} ms, reference {ref * 1e3:9.1f} ms "
                  f"({note}), speed-up {ref / fast:6.1f}x{agree}")


if __name__ == "__main__":
    main()
