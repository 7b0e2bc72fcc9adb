"""Throughput of the MSD training step, msd_jax against an equivalent PyTorch step.

  python benchmarks/step_throughput.py --config demo --out /tmp/demo.json
  python benchmarks/step_throughput.py --config vit_s16 --batch 8 --steps 5 --out /tmp/s16.json
  python benchmarks/step_throughput.py --smoke --out /tmp/smoke.json      # tiny dims, 2 steps

Each framework runs in its own subprocess (so the peak RSS of one never includes the other's
libraries, compiled code or buffers), pinned to the same `--threads` cores (sched_setaffinity before
the framework is imported: XLA sizes its intra-op pool from the schedulable cores;
torch.set_num_threads for PyTorch). Each worker builds its step (JAX: `lower().compile()`, timed as
compile_s) and runs `--warmup` steps, one worker after the other; then the driver interleaves their
timed steps (jax, torch, torch, jax, ...), `--steps` each, each waited for, so the bursts of a noisy
shared machine hit both alike. images/s is batch / median step time; the ratio is the median of the
per-pair ratios. FLOPs per step are XLA's cost analysis of the compiled step; the PyTorch FLOPs are
torch.utils.flop_counter's count (matrix products and attention only), shown for comparison.

Peak RSS: `peak_rss_mb` is the subprocess's ru_maxrss (everything: imports, initialisation,
compilation, steps); `steady_rss_mb` is the peak RSS over the timed steps alone (VmHWM reset through
/proc/self/clear_refs after the warm-up). Speed is reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = ("demo", "vit_s16", "vit_b16")
# batch used on CPU when --batch is not given (ViT-S/B at 224 px are slow on a few cores)
CPU_BATCH = {"demo": None, "vit_s16": 8, "vit_b16": 4}


# ------------------------------------------------------------------------------------------------
# the spec both workers build from
# ------------------------------------------------------------------------------------------------
def make_spec(args) -> dict:
    import stepbuild  # noqa: PLC0415
    c = stepbuild.load_config(args.config, smoke=args.smoke)
    batch = args.batch or (8 if args.smoke else CPU_BATCH.get(args.config) or c.train.batch_size)
    _, cfg, sc = stepbuild.resolve(c, batch)
    return dict(
        config=args.config, smoke=args.smoke, batch=batch, steps=args.steps, warmup=args.warmup,
        threads=args.threads, dtype=args.dtype, matmul_dtype=getattr(args, "matmul_dtype", "float32"), xla_flags=args.xla_flags,
        torch_omp_passive=not getattr(args, "torch_omp_active", False),
        model=dict(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                   mlp_ratio=cfg.mlp_ratio, out_dim=cfg.out_dim, head_hidden_dim=cfg.head_hidden_dim,
                   head_bottleneck_dim=cfg.head_bottleneck_dim, head_layers=cfg.head_layers,
                   image_size=cfg.image_size, patch_size=cfg.patch_size, num_tokens=cfg.num_patches),
        views=dict(num_global=sc.num_global, size_global=sc.size_global,
                   num_local=sc.num_local, size_local=sc.size_local),
        hp=dict(lr=sc.lr, weight_decay=sc.weight_decay, momentum=sc.momentum_teacher,
                student_temp=sc.student_temp, teacher_temp=sc.teacher_temp,
                center_momentum=sc.center_momentum, clip_grad=sc.clip_grad),
    )


def spec_tokens(spec: dict):
    """The synthetic batch of the spec, the same in both workers."""
    import stepbuild  # noqa: PLC0415
    m = spec["model"]
    return stepbuild.synthetic_tokens(spec["batch"], m["num_tokens"], m["embed_dim"])


# ------------------------------------------------------------------------------------------------
# worker helpers (run inside the subprocess)
# ------------------------------------------------------------------------------------------------
def _pin(threads: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
        raise SystemExit(f"--threads {threads}: only {len(cores)} schedulable cores")
    os.sched_setaffinity(0, set(cores[:threads]))


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    import resource  # noqa: PLC0415
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _serve(run_one):
    """After the warm-up: tell the driver we are ready, then run one timed step per 'step' line on
    stdin until 'done'. Returns (step times, peak RSS over the timed steps in MB)."""
    reset = _reset_peak_rss()
    print("READY", flush=True)
    times = []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - t)
        print(f"{times[-1]:.6f}", flush=True)
    return times, (_rss_mb("VmHWM") if reset else float("nan"))


def worker_jax(spec: dict) -> dict:
    if spec["xla_flags"]:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + spec["xla_flags"]).strip()
    t_import = time.perf_counter()
    import jax  # noqa: PLC0415
    import stepbuild  # noqa: PLC0415
    from msd_jax.msd import step as step_lib  # noqa: PLC0415
    import_s = time.perf_counter() - t_import
    rss_imports = _rss_mb("VmRSS")

    dtype = spec["dtype"] or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    bench = stepbuild.build_step(stepbuild.load_config(spec["config"], smoke=spec["smoke"]),
                                 spec["batch"], dtype=dtype, matmul_dtype=spec["matmul_dtype"])

    t = time.perf_counter()
    compiled = bench.compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    if spec.get("trim", True):
        step_lib.release_host_memory()  # as train.train does after its first step
    rss_compiled = _rss_mb("VmRSS")
    box = {}

    def run_one():
        metrics = bench.run(compiled)
        jax.block_until_ready((bench.state, metrics))
        box["loss"] = metrics["loss"]

    for _ in range(spec["warmup"]):
        run_one()
    times, steady = _serve(run_one)
    dev = jax.devices()[0]
    return dict(framework="jax", backend=jax.default_backend(), device_kind=dev.device_kind, dtype=dtype,
                step_times_s=times, compile_s=compile_s, import_s=import_s, flops_per_step=flops,
                peak_rss_mb=_maxrss_mb(), steady_rss_mb=steady, rss_after_imports_mb=rss_imports,
                rss_after_compile_mb=rss_compiled, loss=float(box["loss"]),
                jax_version=jax.__version__, device_memory=_jax_device_memory(dev))


def _jax_device_memory(dev):
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001  (CPU devices may not implement it)
        stats = None
    if not stats:
        return None
    return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def worker_torch(spec: dict) -> dict:
    t_import = time.perf_counter()
    import torch  # noqa: PLC0415
    import torch_reference as tr  # noqa: PLC0415
    import_s = time.perf_counter() - t_import
    torch.set_num_threads(spec["threads"])
    rss_imports = _rss_mb("VmRSS")
    torch.manual_seed(0)
    m, v, hp = spec["model"], spec["views"], spec["hp"]
    model = tr.Student(m["embed_dim"], m["depth"], m["num_heads"], m["out_dim"], m["mlp_ratio"],
                       m["head_hidden_dim"], m["head_bottleneck_dim"], m["head_layers"])
    amp = torch.bfloat16 if spec["matmul_dtype"] == "bfloat16" else None
    step = tr.TorchMSDStep(model, **v, **hp, amp_dtype=amp)
    tokens = torch.from_numpy(spec_tokens(spec))
    box = {}

    def run_one():
        box["loss"] = float(step.step(tokens))  # the float() is the sync (CPU torch is eager anyway)

    t = time.perf_counter()
    for _ in range(spec["warmup"]):
        run_one()
    warm_s = time.perf_counter() - t
    times, steady = _serve(run_one)
    peak = _maxrss_mb()
    flops = float("nan")
    try:  # after the measurements: the counter's own memory is not in the peaks above
        from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415
        with FlopCounterMode(display=False) as counter:
            step.step(tokens)
        flops = float(counter.get_total_flops())
    except Exception:  # noqa: BLE001
        pass
    return dict(framework="torch", step_times_s=times, warmup_s=warm_s, import_s=import_s,
                flops_per_step=flops, peak_rss_mb=peak, steady_rss_mb=steady,
                rss_after_imports_mb=rss_imports, loss=box["loss"], torch_version=torch.__version__,
                torch_threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
class Worker:
    """One framework in its own subprocess: built, compiled and warmed up on start, then one timed
    step per `step()` call, so the driver can interleave the two frameworks step by step."""

    def __init__(self, framework: str, spec: dict, timeout: float):
        env = dict(os.environ)
        env.setdefault("PYTHONHASHSEED", "0")
        env["OMP_NUM_THREADS"] = str(spec["threads"])  # one pool of the requested size
        env["MKL_NUM_THREADS"] = str(spec["threads"])
        if framework == "torch" and spec.get("torch_omp_passive", True):
            # idle OpenMP threads sleep instead of spinning: on a shared machine PyTorch's spinning
            # barriers lose 2-4x (demo step at load 5 on 2 cores: 4-10 s spinning, 2.1-2.7 s passive)
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.framework, self.timeout = framework, timeout
        cmd = [sys.executable, __file__, "--worker", framework, "--spec", json.dumps(spec)]
        self.err = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty worker never blocks
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, env=env)
        self._expect("READY")

    def _readline(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.err.seek(0)
            err = self.err.read()
            raise RuntimeError(f"{self.framework} worker died ({self.proc.wait()}):\n{err[-4000:]}")
        return line.strip()

    def _expect(self, word):
        while self._readline() != word:  # skip anything a library printed to stdout first
            pass

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._readline())

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        self.proc.stdin.close()
        out = self._readline()
        self.proc.wait(timeout=self.timeout)
        return json.loads(out)


def run_pair(spec: dict, timeout: float, with_torch: bool):
    """Both workers started one after the other (their compilations never overlap), then their timed
    steps interleaved (jax, torch, torch, jax, ...), so machine noise hits both alike."""
    workers = [Worker("jax", spec, timeout)]
    if with_torch:
        workers.append(Worker("torch", spec, timeout))
    for i in range(spec["steps"]):
        for w in (workers if i % 2 == 0 else workers[::-1]):
            w.step()
    results = [w.finish() for w in workers]
    return results[0], (results[1] if with_torch else None)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(spec: dict, runs_jax: list, runs_torch: list) -> dict:
    b = spec["batch"]
    nviews = spec["views"]["num_global"] + spec["views"]["num_local"]
    jt = [t for r in runs_jax for t in r["step_times_s"]]
    tt = [t for r in runs_torch for t in r["step_times_s"]]
    ips, tips = b / statistics.median(jt), (b / statistics.median(tt) if tt else None)
    ratios = [t / j for j, t in zip(jt, tt)]  # interleaved steps, paired
    j0 = runs_jax[0]
    step_s = b / ips
    out = dict(
        config=spec["config"], smoke=spec["smoke"], batch=b, steps=spec["steps"],
        warmup=spec["warmup"], repeats=len(runs_jax), threads=spec["threads"], dtype=j0["dtype"],
        matmul_dtype=spec["matmul_dtype"],
        xla_flags=spec["xla_flags"], views=spec["views"], model=spec["model"],
        torch_omp_wait_policy="PASSIVE" if spec.get("torch_omp_passive", True) else "default",
        device=(f"{j0['backend']}: {cpu_name()} ({spec['threads']} threads)" if j0["backend"] == "cpu"
                else f"{j0['backend']}: {j0['device_kind']}"),
        images_per_s=ips,
        student_views_per_s=ips * nviews,
        step_s=step_s,
        best_images_per_s=b / min(jt),
        compile_s=j0["compile_s"],
        flops_per_step=j0["flops_per_step"],
        achieved_flops=j0["flops_per_step"] / step_s,
        peak_rss_mb=max(r["peak_rss_mb"] for r in runs_jax),
        steady_rss_mb=max(r["steady_rss_mb"] for r in runs_jax),
        rss_after_imports_mb=j0["rss_after_imports_mb"],
        rss_after_compile_mb=j0["rss_after_compile_mb"],
        jax_version=j0["jax_version"],
        python=platform.python_version(),
        step_times_s=jt,
        runs=dict(jax=runs_jax, torch=runs_torch),
    )
    if runs_torch:
        t0 = runs_torch[0]
        tstep = b / tips
        out.update(
            torch_images_per_s=tips,
            torch_student_views_per_s=tips * nviews,
            torch_step_s=tstep,
            torch_best_images_per_s=b / min(tt),
            best_ratio_vs_torch=min(tt) / min(jt),
            torch_flops_per_step_matmul=t0["flops_per_step"],
            torch_achieved_flops_matmul=t0["flops_per_step"] / tstep,
            torch_peak_rss_mb=max(r["peak_rss_mb"] for r in runs_torch),
            torch_steady_rss_mb=max(r["steady_rss_mb"] for r in runs_torch),
            torch_rss_after_imports_mb=t0["rss_after_imports_mb"],
            torch_version=t0["torch_version"],
            torch_step_times_s=tt,
            ratio_vs_torch=statistics.median(ratios),
            ratio_vs_torch_steps=ratios,
        )
    return out


def table(r: dict) -> str:
    rows = [("images/s", "images_per_s", "torch_images_per_s", "{:.2f}"),
            ("student views/s", "student_views_per_s", "torch_student_views_per_s", "{:.1f}"),
            ("step (s), median", "step_s", "torch_step_s", "{:.3f}"),
            ("images/s, fastest step", "best_images_per_s", "torch_best_images_per_s", "{:.2f}"),
            ("compile (s)", "compile_s", None, "{:.1f}"),
            ("GFLOP/step (XLA | torch matmul)", "flops_per_step", "torch_flops_per_step_matmul", "{:.3g}"),
            ("achieved GFLOP/s", "achieved_flops", "torch_achieved_flops_matmul", "{:.3g}"),
            ("peak RSS (MB)", "peak_rss_mb", "torch_peak_rss_mb", "{:.0f}"),
            ("steady RSS (MB)", "steady_rss_mb", "torch_steady_rss_mb", "{:.0f}"),
            ("RSS after imports (MB)", "rss_after_imports_mb", "torch_rss_after_imports_mb", "{:.0f}")]
    giga = {"flops_per_step", "torch_flops_per_step_matmul", "achieved_flops", "torch_achieved_flops_matmul"}

    def fmt(key, f):
        if key is None or key not in r:
            return "-"
        v = r[key] / 1e9 if key in giga else r[key]
        return f.format(v)

    matmuls = f" (bfloat16 matmuls)" if r.get("matmul_dtype") == "bfloat16" else ""
    head = (f"{r['config']}: batch {r['batch']}, views {r['views']['num_global']}x"
            f"{r['views']['size_global']} + {r['views']['num_local']}x{r['views']['size_local']} tokens, "
            f"{r['dtype']}{matmuls}, {r['device']}, {r['repeats']} x {r['steps']} steps")
    lines = [head, f"| {'':32} | {'msd_jax':>12} | {'PyTorch':>12} |", f"|{'-' * 34}|{'-' * 14}|{'-' * 14}|"]
    for name, kj, kt, f in rows:
        lines.append(f"| {name:32} | {fmt(kj, f):>12} | {fmt(kt, f):>12} |")
    if "ratio_vs_torch" in r:
        lines.append(f"msd_jax / PyTorch images/s: {r['ratio_vs_torch']:.2f} (median of the "
                     f"{len(r['ratio_vs_torch_steps'])} interleaved step pairs; fastest steps: "
                     f"{r['best_ratio_vs_torch']:.2f})")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=CONFIGS, default="demo")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 8; 2 with --smoke)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (start both workers, interleave their steps)")
    p.add_argument("--threads", type=int, default=None, help="cores for each framework (default: all schedulable)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the config's; 8 for vit_s16, 4 for vit_b16)")
    p.add_argument("--dtype", default=None, help="model.dtype for JAX (default float32 on CPU, bfloat16 otherwise)")
    p.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model.matmul_dtype for JAX (bfloat16: bf16 operands, float32 accumulation); "
                        "bfloat16 runs PyTorch under CPU autocast to bfloat16, its equivalent")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS in the JAX worker")
    p.add_argument("--no-torch", action="store_true", help="JAX only")
    p.add_argument("--torch-omp-active", action="store_true",
                   help="leave OMP_WAIT_POLICY to its default (spinning) for PyTorch; the default "
                        "sets PASSIVE, PyTorch's best setting on a shared machine")
    p.add_argument("--smoke", action="store_true", help="tiny dims, 2 steps (tests)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.spec)
        _pin(spec["threads"])
        result = (worker_jax if args.worker == "jax" else worker_torch)(spec)
        print(json.dumps(result))
        return result

    args.steps = args.steps or (2 if args.smoke else 8)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    spec = make_spec(args)
    runs_jax, runs_torch = [], []
    for _ in range(args.repeats):
        rj, rt = run_pair(spec, args.timeout, not args.no_torch)
        runs_jax.append(rj)
        if rt is not None:
            runs_torch.append(rt)
    result = summarize(spec, runs_jax, runs_torch)
    print(table(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
