"""A/B of two JAX step variants (XLA flags) on one config, steps interleaved between two workers.

  python benchmarks/ab_flags.py --config demo --a "" --b "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
"""
import argparse
import json
import os
import statistics

import step_throughput as st


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="demo")
    p.add_argument("--a", default="")
    p.add_argument("--b", default="")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--out")
    p.add_argument("--trim-b", action="store_true", help="only B releases the compiler heap after compiling (both do by default)")
    args = p.parse_args()
    base = argparse.Namespace(config=args.config, smoke=False, batch=args.batch, steps=args.steps,
                              warmup=1, threads=len(os.sched_getaffinity(0)), dtype=None, xla_flags="")
    spec = st.make_spec(base)
    wa = st.Worker("jax", dict(spec, xla_flags=args.a, trim=not args.trim_b), 900)
    wb = st.Worker("jax", dict(spec, xla_flags=args.b, trim=True), 900)
    for i in range(args.steps):
        for w in ((wa, wb) if i % 2 == 0 else (wb, wa)):
            w.step()
    ra, rb = wa.finish(), wb.finish()
    ta, tb = ra["step_times_s"], rb["step_times_s"]
    res = dict(config=args.config, a=args.a, b=args.b, a_median_s=statistics.median(ta),
               b_median_s=statistics.median(tb), a_min_s=min(ta), b_min_s=min(tb),
               speedup_b_over_a=statistics.median([x / y for x, y in zip(ta, tb)]),
               a_peak_rss_mb=ra["peak_rss_mb"], b_peak_rss_mb=rb["peak_rss_mb"],
               a_steady_rss_mb=ra["steady_rss_mb"], b_steady_rss_mb=rb["steady_rss_mb"],
               a_compile_s=ra["compile_s"], b_compile_s=rb["compile_s"])
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
