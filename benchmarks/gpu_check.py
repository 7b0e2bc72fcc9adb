"""The GPU check run by benchmarks/gpu_check.sh (see there). One card, no network, under 10 minutes.

Measures the bf16 matmul peak of the card (JAX and torch), then the MSD step of msd_jax (bf16
compute, float32 params/softmax/loss) and of PyTorch (bf16 autocast; timm's ViT blocks when timm
imports, else benchmarks/torch_reference.py) for ViT-S/16 and ViT-B/16 at 224 px with the configs'
views: images/s, MFU against the measured peak (FLOPs per step from XLA's cost analysis of the JAX
step; the PyTorch step does the same work, see tests/test_benchmarks.py), device memory. Each
measurement runs in its own subprocess (JAX preallocates GPU memory; peaks stay separate).

GPU_CHECK_DRY_RUN=1 shrinks everything (tiny model, small matmul, 2 steps) so it runs on a CPU.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

DRY = os.environ.get("GPU_CHECK_DRY_RUN", "0") not in ("", "0")
BATCH = {"vit_s16": 128, "vit_b16": 64}
STEPS, WARMUP = (2, 1) if DRY else (10, 2)


def _spec(config: str) -> dict:
    import argparse  # noqa: PLC0415
    import step_throughput as st  # noqa: PLC0415
    args = argparse.Namespace(config=config, smoke=DRY, batch=8 if DRY else BATCH[config], steps=STEPS,
                              warmup=WARMUP, threads=1, dtype="bfloat16", xla_flags="")
    return st.make_spec(args)


def _median_time(fn, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


# ------------------------------------------------------------------------------------------------
def w_matmul_jax(_):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    n = 256 if DRY else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    reps = 2 if DRY else 50

    def run():
        out = None
        for _ in range(reps):
            out = f(a, b)
        out.block_until_ready()
    run()
    t, _ = _median_time(run, 3 if DRY else 5)
    return dict(n=n, tflops=2 * n ** 3 * reps / t / 1e12, device=str(jax.devices()[0].device_kind),
                jax_version=jax.__version__)


def w_matmul_torch(_):
    import torch  # noqa: PLC0415
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 256 if DRY else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    reps = 2 if DRY else 50
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def run():
        for _ in range(reps):
            a @ b
        sync()
    run()
    t, _ = _median_time(run, 3 if DRY else 5)
    return dict(n=n, tflops=2 * n ** 3 * reps / t / 1e12,
                device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                torch_version=torch.__version__)


def w_step_jax(config):
    import jax  # noqa: PLC0415
    import stepbuild  # noqa: PLC0415
    spec = _spec(config)
    b = spec["batch"]
    bench = stepbuild.build_step(stepbuild.load_config(config, smoke=DRY), b, dtype="bfloat16")
    t = time.perf_counter()
    compiled = bench.compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    def run():
        jax.block_until_ready(bench.run(compiled))
    for _ in range(WARMUP):
        run()
    t, times = _median_time(run, STEPS)
    dev = jax.devices()[0]
    mem = None
    try:
        stats = dev.memory_stats() or {}
        mem = stats.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001
        pass
    return dict(batch=b, step_s=t, times_s=times, images_per_s=b / t, compile_s=compile_s,
                flops_per_step=float(cost["flops"]), peak_device_bytes=mem, device=str(dev.device_kind))


def w_step_torch(config):
    import torch  # noqa: PLC0415
    import torch_reference as tr  # noqa: PLC0415
    import step_throughput as st  # noqa: PLC0415
    spec = _spec(config)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m, v, hp = spec["model"], spec["views"], spec["hp"]
    torch.manual_seed(0)
    model = tr.Student(m["embed_dim"], m["depth"], m["num_heads"], m["out_dim"], m["mlp_ratio"],
                       m["head_hidden_dim"], m["head_bottleneck_dim"], m["head_layers"])
    impl = "torch_reference"
    try:  # timm's blocks (fused attention, the usual PyTorch ViT) in place of ours
        from timm.models.vision_transformer import VisionTransformer  # noqa: PLC0415
        tv = VisionTransformer(img_size=m["image_size"], patch_size=m["patch_size"],
                               embed_dim=m["embed_dim"], depth=m["depth"], num_heads=m["num_heads"],
                               mlp_ratio=m["mlp_ratio"], num_classes=0)
        model.body.blocks, model.body.norm = tv.blocks, tv.norm
        impl = "timm VisionTransformer blocks"
    except Exception:  # noqa: BLE001  (timm absent, or its torchvision import fails)
        pass
    step = tr.TorchMSDStep(model, **v, **hp, device=dev, amp_dtype=torch.bfloat16)
    tokens = torch.from_numpy(st.spec_tokens(spec)).to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def run():
        step.step(tokens)
        sync()
    for _ in range(WARMUP):
        run()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t, times = _median_time(run, STEPS)
    mem = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return dict(batch=spec["batch"], step_s=t, times_s=times, images_per_s=spec["batch"] / t,
                peak_device_bytes=mem, impl=impl, torch_version=torch.__version__)


WORKERS = {"matmul_jax": w_matmul_jax, "matmul_torch": w_matmul_torch, "step_jax": w_step_jax,
           "step_torch": w_step_torch}


def sub(name: str, arg: str = "", timeout: float = 240) -> dict:
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, arg], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}",
                "stderr_tail": proc.stderr[-2000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(WORKERS[sys.argv[2]](sys.argv[3] if len(sys.argv) > 3 else None)))
        return
    out_path = sys.argv[1] if len(sys.argv) > 1 else "gpu_check.json"
    t0 = time.perf_counter()
    # per-worker time limits sum to 550 s (gpu_check.sh stops everything at 570 s); the JSON is
    # rewritten after every measurement, so a stopped run keeps what it measured
    def save():
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    res = {"dry_run": DRY, "matmul_jax": sub("matmul_jax", timeout=45)}
    res["matmul_torch"] = sub("matmul_torch", timeout=45)
    save()
    peak = max([r.get("tflops", 0.0) for r in (res["matmul_jax"], res["matmul_torch"])]) * 1e12
    res["peak_bf16_flops"] = peak
    for config in ("vit_s16", "vit_b16"):
        j = sub("step_jax", config, timeout=140)
        res[config] = {"jax": j}
        save()
        tt = sub("step_torch", config, timeout=90)
        flops = j.get("flops_per_step")
        for r in (j, tt):
            if "step_s" in r and flops and peak:
                r["mfu"] = flops / r["step_s"] / peak
        res[config] = {"jax": j, "torch": tt}
        if "images_per_s" in j and "images_per_s" in tt:
            res[config]["ratio_vs_torch"] = j["images_per_s"] / tt["images_per_s"]
        save()
    res["wall_s"] = time.perf_counter() - t0

    def g(r, k, f):
        return f.format(r[k]) if isinstance(r.get(k), (int, float)) else "-"
    print(f"device: {res['matmul_jax'].get('device', '?')} | bf16 matmul peak: JAX "
          f"{g(res['matmul_jax'], 'tflops', '{:.1f}')} TFLOP/s, torch {g(res['matmul_torch'], 'tflops', '{:.1f}')} TFLOP/s"
          f"{' (DRY RUN: tiny sizes, numbers meaningless)' if DRY else ''}")
    print(f"| {'model':8} | {'framework':9} | {'batch':>5} | {'images/s':>9} | {'MFU':>6} | {'device GiB':>10} | note")
    print(f"|{'-' * 10}|{'-' * 11}|{'-' * 7}|{'-' * 11}|{'-' * 8}|{'-' * 12}|------")
    for config in ("vit_s16", "vit_b16"):
        for fw in ("jax", "torch"):
            r = res[config][fw]
            gib = f"{r['peak_device_bytes'] / 2 ** 30:.1f}" if r.get("peak_device_bytes") else "-"
            note = r.get("error", r.get("impl", ""))
            print(f"| {config:8} | {fw:9} | {g(r, 'batch', '{:d}'):>5} | {g(r, 'images_per_s', '{:.1f}'):>9} | "
                  f"{g(r, 'mfu', '{:.1%}'):>6} | {gib:>10} | {note}")
        if "ratio_vs_torch" in res[config]:
            print(f"{config}: msd_jax / PyTorch images/s = {res[config]['ratio_vs_torch']:.2f}")
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out_path} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
