"""Shared by the CPU peers: the median wall-clock milliseconds of fn() over `iters` calls after `warm`."""
import time


def med(fn, warm=1, iters=5):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3
