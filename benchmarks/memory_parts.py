"""XLA's temporary buffer (compile only, deterministic) for pieces of the MSD step: the student's
gradient on the global views, on the local views, on both in one loss, and on both one after the
other (with `jax.lax.optimization_barrier`, and with the data dependency `msd_jax.msd.step.after`).
The measurement behind change 6 in NOTES.md.

  python benchmarks/memory_parts.py demo 64
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import stepbuild
from msd_jax.models import vit
from msd_jax.msd import step as step_lib

name = sys.argv[1] if len(sys.argv) > 1 else "demo"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
# the float32 step that NOTES.md changes 6-7 measured
bench = stepbuild.build_step(stepbuild.load_config(name), batch, dtype="float32",
                             matmul_dtype="float32", steady=False, abstract=True)
cfg, sc, params = bench.model, bench.step_config, bench.state.params
student = vit.Student(cfg, 1)
g = jax.ShapeDtypeStruct((sc.num_global * batch, sc.size_global, cfg.embed_dim), np.float32)
loc = jax.ShapeDtypeStruct((sc.num_local * batch, sc.size_local, cfg.embed_dim), np.float32)
options = step_lib.compiler_options(bench.mesh)


def loss(p, views):
    return jnp.sum(student.apply({"params": p}, views))


def joint(p, g, loc):
    return jax.grad(lambda q: loss(q, g) + loss(q, loc))(p)


def barrier(p, g, loc):
    gg = jax.grad(loss)(p, g)
    p2, gg = jax.lax.optimization_barrier((p, gg))
    return jax.tree_util.tree_map(jnp.add, gg, jax.grad(loss)(p2, loc))


def dependency(p, g, loc):
    gg = jax.grad(loss)(p, g)
    return jax.tree_util.tree_map(jnp.add, gg, jax.grad(loss)(p, step_lib.after(loc, gg)))


rows = [("globals only", jax.grad(loss), (params, g)), ("locals only", jax.grad(loss), (params, loc)),
        ("both, one loss", joint, (params, g, loc)), ("in turn, optimization_barrier", barrier, (params, g, loc)),
        ("in turn, step.after dependency", dependency, (params, g, loc))]
print(f"{name}, batch {batch}: XLA temporary buffer of the student's gradient")
for label, fn, args in rows:
    mem = jax.jit(fn, compiler_options=options).lower(*args).compile().memory_analysis()
    print(f"  {label:32s} {mem.temp_size_in_bytes / 1e6:8.0f} MB")
