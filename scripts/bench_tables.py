#!/usr/bin/env python3
"""Markdown tables from `shardseal bench --json` output, as BENCHMARKS.md shows them.

    shardseal bench --model M.onnx --stages 1,2,4 --json > m.jsonl
    python3 scripts/bench_tables.py m.jsonl [more.jsonl ...]

Prints the latency and throughput table, CPU per request by process, the cold-start table,
the memory table and, for runs with `--max-batch`, the batching table, for every stage count
of every file. A figure the run did not produce prints as n/a.
"""

import json
import sys


def fmt(value, digits=1):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def load(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            runs += [json.loads(line) for line in f if line.strip().startswith("{")]
    return runs


def main():
    runs = load(sys.argv[1:])
    print("| model | stages | cut KiB/req | plain p50 / p99 ms | sealed p50 / p99 ms | overhead "
          "| plain rps (best p) | sealed rps @C | thr. ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['model']} | {r['stages']} | {r['cut_bytes_per_request'] / 1024:.1f} "
              f"| {fmt(r['plain_ms_p50'], 2)} / {fmt(r['plain_ms_p99'], 2)} "
              f"| {fmt(r['sealed_ms_p50'], 2)} / {fmt(r['sealed_ms_p99'], 2)} "
              f"| {fmt(r['overhead_ratio'], 3)} "
              f"| {fmt(r['plain_rps'], 2)} (p={r['plain_best_parallelism']}) "
              f"| {fmt(r['sealed_rps'], 2)} @{r['concurrency']} "
              f"| {fmt(r['throughput_ratio'], 3)} | {r['max_abs_diff']:.1e} |")
    if any("cpu_ms_per_request" in r for r in runs):
        print()
        print("| model | stages | plain CPU ms/req | sealed CPU ms/req | client | coordinator "
              "| functions (per stage) | stages' own run ms (latency runs) "
              "| cores busy, plain at its best / sealed |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            c = r.get("cpu_ms_per_request")
            if not c:
                continue
            stages = ", ".join(fmt(x, 1) for x in c["stages"])
            runs_ms = sum(s["run_ms"] for s in r["stage_ms_p50"])
            busy = r.get("cores_busy")
            if busy:
                plain_busy = dict(busy["plain_by_parallelism"]).get(r["plain_best_parallelism"])
                busy = f"{fmt(plain_busy, 2)} / {fmt(busy['sealed'], 2)}"
            else:
                busy = "n/a"
            print(f"| {r['model']} | {r['stages']} | {fmt(c['plain'], 1)} | {fmt(c['sealed'], 1)} "
                  f"| {fmt(c['client'], 2)} | {fmt(c['coordinator'], 2)} | {stages} "
                  f"| {fmt(runs_ms, 1)} | {busy} |")
    if any(r.get("max_batch", 1) > 1 for r in runs):
        print()
        print("| model | stages | max batch | requests per run | sealed rps @C | thr. ratio "
              "| under load p50 / p99 ms | one at a time p50 ms |")
        print("|---|---|---|---|---|---|---|---|")
        for r in runs:
            print(f"| {r['model']} | {r['stages']} | {r.get('max_batch', 1)} "
                  f"| {fmt(r.get('mean_batch'), 2)} "
                  f"| {fmt(r['sealed_rps'], 1)} @{r['concurrency']} "
                  f"| {fmt(r['throughput_ratio'], 3)} "
                  f"| {fmt(r.get('sealed_loaded_ms_p50'), 2)} / "
                  f"{fmt(r.get('sealed_loaded_ms_p99'), 2)} "
                  f"| {fmt(r['sealed_ms_p50'], 2)} |")
    print()
    print("| model | stages | slowest ready ms | cold/plain (worst stage) "
          "| cold/plain in a fresh process (worst stage) | whole-model plain load ms "
          "| decrypt GB/s in memory (in place / received and decrypted) "
          "| decrypt GB/s in functions | fetch+decrypt GB/s in functions |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        parts = r.get("decrypt_parts_gbps") or {}
        print(f"| {r['model']} | {r['stages']} | {fmt(r['cold_start_ms'])} "
              f"| {fmt(r['cold_start_ratio'], 2)} | {fmt(r.get('cold_start_fresh_ratio'), 2)} "
              f"| {fmt(r['plain_load_ms'])} "
              f"| {fmt(r['decrypt_gbps'], 2)} / {fmt(parts.get('gather_and_open'), 2)} "
              f"| {fmt(r.get('function_decrypt_gbps'), 2)} "
              f"| {fmt(r['function_fetch_decrypt_gbps'], 2)} |")
    print()
    print("| model | stage | ready | process | connect | attest | fetch | decrypt | fetch+decrypt | load "
          "| optimise | plain parse | plain optimise | plain load | ready / plain "
          "| plain load, fresh process | ready / fresh | shard MiB "
          "| peak RSS MiB | of it file-backed | RSS limit 1.5 x shard + 64 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        for c in r["stage_cold_start"]:
            i = c["stage"]
            shard = r["stage_shard_mb"][i]
            print(f"| {r['model']} | {i} | {fmt(c['spawn_to_ready_ms'])} "
                  f"| {fmt(c['process_start_ms'])} | {fmt(c.get('connect_ms'))} "
                  f"| {fmt(c['attest_ms'])} "
                  f"| {fmt(c['fetch_ms'])} | {fmt(c['decrypt_ms'])} "
                  f"| {fmt(c['fetch_decrypt_ms'])} | {fmt(c['load_ms'])} "
                  f"| {fmt(c['optimize_ms'])} | {fmt(c['plain_parse_ms'])} "
                  f"| {fmt(c['plain_optimize_ms'])} | {fmt(c['plain_load_ms'])} "
                  f"| {fmt(c['ratio'], 2)} | {fmt(c.get('plain_fresh_process_ms'))} "
                  f"| {fmt(c.get('fresh_ratio'), 2)} | {fmt(shard)} "
                  f"| {fmt(r['stage_peak_rss_mb'][i])} "
                  f"| {fmt(r.get('stage_rss_file_mb', [None] * (i + 1))[i])} "
                  f"| {fmt(1.5 * shard + 64)} |")
    probes = {r["model"].rsplit("-s", 1)[0]: r.get("batch_probe") for r in runs}
    if any(probes.values()):
        print()
        print("| model | batch 1 ms | batch B ms | B | per-request ms at B | throughput gain "
              "| latency factor |")
        print("|---|---|---|---|---|---|---|")
        for model, p in probes.items():
            if not p:
                continue
            per = p["batched_ms"] / p["batch"] if p.get("batched_ms") else None
            print(f"| {model} | {fmt(p['batch1_ms'], 2)} | {fmt(p['batched_ms'], 2)} "
                  f"| {p['batch']} | {fmt(per, 2)} | {fmt(p['throughput_gain'], 2)} "
                  f"| {fmt(p['latency_factor'], 2)} |"
                  + (f" {p['error']}" if p.get("error") else ""))


if __name__ == "__main__":
    main()
