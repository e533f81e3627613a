#!/usr/bin/env python3
"""onnxruntime on the benchmark models: the unprotected reference for BENCHMARKS.md.

    pip install onnxruntime numpy
    python3 scripts/onnxruntime_bench.py MODEL.onnx [MODEL.onnx ...] [--requests 40]
        [--concurrency 4] [--json]

For each model and each intra-op thread count (1, as tract runs in ShardSeal, and all
cores), prints batch-1 latency p50/p99 (one request at a time) and throughput with
--concurrency requests in flight (Python threads; onnxruntime releases the GIL while it
runs). Inputs are seeded uniform [-1, 1), like `shardseal bench`.
"""

import argparse
import json
import os
import threading
import time

import numpy as np
import onnxruntime as ort


def percentile(values, q):
    """Nearest-rank percentile, as `shardseal bench` computes it."""
    values = sorted(values)
    rank = max(1, min(len(values), int(np.ceil(q * len(values)))))
    return values[rank - 1]


def session(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def bench(path, threads, requests, concurrency, warmup=2):
    started = time.perf_counter()
    sess = session(path, threads)
    load_ms = (time.perf_counter() - started) * 1e3
    rng = np.random.default_rng(1)
    feeds = []
    for _ in range(4):
        feed = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            feed[i.name] = rng.uniform(-1, 1, shape).astype(np.float32)
        feeds.append(feed)
    for r in range(warmup):
        sess.run(None, feeds[r % 4])
    latencies = []
    for r in range(requests):
        t = time.perf_counter()
        sess.run(None, feeds[r % 4])
        latencies.append((time.perf_counter() - t) * 1e3)

    counter = iter(range(requests))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                r = next(counter, None)
            if r is None:
                return
            sess.run(None, feeds[r % 4])

    t = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(concurrency)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    rps = requests / (time.perf_counter() - t)
    return {
        "model": os.path.basename(path),
        "engine": "onnxruntime " + ort.__version__,
        "intra_op_threads": threads,
        "load_ms": load_ms,
        "ms_p50": percentile(latencies, 0.5),
        "ms_p99": percentile(latencies, 0.99),
        "rps": rps,
        "concurrency": concurrency,
        "requests": requests,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    for path in args.models:
        for threads in sorted({1, cores}):
            result = bench(path, threads, args.requests, args.concurrency)
            if args.json:
                print(json.dumps(result))
            else:
                print(
                    f"{result['model']:<18} threads {threads}: load {result['load_ms']:.0f} ms, "
                    f"p50 {result['ms_p50']:.2f} ms, p99 {result['ms_p99']:.2f} ms, "
                    f"{result['rps']:.2f} rps at concurrency {args.concurrency}"
                )


if __name__ == "__main__":
    main()
