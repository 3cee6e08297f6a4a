"""Caption benchmarks, measured in one run:

1. PCFG raw captions per second on one core (one process, one thread): the
   grammar sampler plus the per-record seed, on random attribute sets of the
   size annotate keeps (6-14). Target >= 20,000 captions/s.
2. The rewrite client's throughput against a local OpenAI-compatible endpoint
   with a fixed latency (200 ms) at concurrency 64, as achieved / ideal, where
   ideal = concurrency / latency requests per second. Target >= 0.9. The
   endpoint is tests/llm_server.py (the stand-in for vLLM) in its own process;
   an empty cache, so every request goes over HTTP. A rerun from the cache is timed too.

    python bench/bench_captions.py [--captions 50000] [--requests 1280] [--concurrency 64] [--latency 0.2]
    python bench/bench_captions.py --smoke     # CI size: 3,000 captions, 192 requests; a few seconds

It prints the figures, then them as JSON on the last line. It exits 1 when a
rewrite request failed or a caption came out empty (a broken code path),
never for a missed target.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
SMOKE = {"captions": 3000, "requests": 192, "concurrency": 64, "latency": 0.2}

from facecap.attributes import ATTRIBUTES  # noqa: E402
from facecap.settings import LLMSettings  # noqa: E402
from facecap.text.grammar import caption_seed, load_grammar  # noqa: E402
from facecap.text.llm import LLMClient  # noqa: E402


def bench_grammar(n: int) -> dict:
    grammar = load_grammar()
    rng = random.Random(0)
    sets = []
    for _ in range(1000):
        kept = rng.sample(ATTRIBUTES, rng.randint(6, 14))
        sets.append((kept, rng.sample([a for a in ATTRIBUTES if a not in kept], 8)))
    for i in range(2000):  # warm-up
        grammar.caption(*sets[i % 1000], seed=i)
    started, cpu = time.perf_counter(), time.process_time()
    words = empty = 0
    for i in range(n):
        kept, absent = sets[i % 1000]
        caption_words = len(grammar.caption(kept, absent, caption_seed(f"{i:012d}-00", grammar.version)).text.split())
        words += caption_words
        empty += caption_words == 0
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    if empty:
        raise SystemExit(f"bench: {empty} of {n} grammar captions were empty")
    return {"captions": n, "seconds": round(wall, 3), "captions_per_s": round(n / wall),
            "captions_per_cpu_s": round(n / cpu), "mean_words": round(words / n, 1),
            # Per core = per CPU-second of this one-threaded process; on a busy machine
            # wall-clock captions/s measures the share of a core it got, not the core.
            "ratio_to_target": round(n / cpu / 20000, 2), "wall_ratio_to_target": round(n / wall / 20000, 2)}


def bench_rewrite(n: int, concurrency: int, latency: float) -> dict:
    # The endpoint runs in its own process, as vLLM would: the figure is the client's.
    server = subprocess.Popen([sys.executable, str(TESTS / "llm_server.py"), "--latency", str(latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            settings = LLMSettings(endpoint=url, model="test-model", concurrency=concurrency)
            conversations = [[{"role": "user", "content": f"Description: A photo of person {i}. They smile."}]
                             for i in range(n)]
            LLMClient(settings, None).chat_many(conversations[:concurrency])  # warm-up: imports, server threads
            client = LLMClient(settings, Path(tmp) / "cache")
            started, cpu = time.perf_counter(), time.process_time()
            results = client.chat_many(conversations[concurrency:])
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            sent = n - concurrency
            failed = [r.error for r in results if not r.ok]
            if failed:
                raise SystemExit(f"bench: {len(failed)} of {sent} rewrite requests failed, e.g. {failed[:3]}")
            achieved, ideal = sent / wall, concurrency / latency
            rerun = LLMClient(settings, Path(tmp) / "cache")
            rerun_started = time.perf_counter()
            rerun.chat_many(conversations[concurrency:])
            rerun_seconds = time.perf_counter() - rerun_started
    finally:
        server.kill()
        server.wait()
    return {"requests": sent, "concurrency": concurrency, "latency_s": latency, "seconds": round(wall, 3),
            "achieved_rps": round(achieved, 1), "ideal_rps": round(ideal, 1),
            "achieved_over_ideal": round(achieved / ideal, 3), "max_in_flight": client.stats.max_in_flight,
            "client_cpu_ms_per_request": round(cpu / sent * 1000, 2),
            "cached_rerun_seconds": round(rerun_seconds, 3), "cached_rerun_requests": rerun.stats.requests}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=1280, help="rewrite requests (the first `concurrency` warm up)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2, help="endpoint latency in seconds")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help=f"CI size: {SMOKE['captions']:,} captions, {SMOKE['requests']} rewrite requests")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.requests <= args.concurrency:
        parser.error("--requests must exceed --concurrency (the first `concurrency` requests are a warm-up)")
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} before the run; figures will be low", file=sys.stderr)
    g = bench_grammar(args.captions)
    print(f"PCFG: {g['captions']:,} captions, one thread: {g['captions_per_cpu_s']:,} per CPU-second (per core), "
          f"{g['captions_per_s']:,}/s wall-clock; mean {g['mean_words']} words; target 20,000/s per core: "
          f"ratio {g['ratio_to_target']} (wall-clock {g['wall_ratio_to_target']})")
    r = bench_rewrite(args.requests, args.concurrency, args.latency)
    print(f"rewrite client: {r['requests']} requests, concurrency {r['concurrency']}, {r['latency_s']} s latency: "
          f"{r['achieved_rps']} req/s achieved vs {r['ideal_rps']} ideal = {r['achieved_over_ideal']} "
          f"(target 0.9); {r['max_in_flight']} in flight, client CPU {r['client_cpu_ms_per_request']} ms/request; "
          f"cached rerun "
          f"{r['cached_rerun_seconds']} s with {r['cached_rerun_requests']} requests")
    figures = {"pcfg": g, "rewrite": r, "load_before": load}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
