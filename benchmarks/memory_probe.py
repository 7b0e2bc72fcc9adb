"""Compile the msd_jax step of a config without running it and print XLA's memory analysis (temporary
buffer, arguments) and FLOPs: deterministic, so memory changes can be measured on a busy machine.

  python benchmarks/memory_probe.py demo 64

(msd_jax.msd.step.jit_train_step now passes the memory-optimised CPU scheduler as a compiler option,
which XLA_FLAGS cannot override; NOTES.md's "before" numbers are from the step before that change.)
"""
import os, sys, time
import jax, numpy as np
HERE = os.path.dirname(os.path.abspath(__file__)); sys.path.insert(0, os.path.dirname(HERE)); sys.path.insert(0, HERE)
import step_throughput as st
from msd_jax.models import vit
from msd_jax.msd import step as step_lib
name = sys.argv[1] if len(sys.argv) > 1 else 'demo'
B = int(sys.argv[2]) if len(sys.argv) > 2 else 64
c = st.load_config(name); c.model.dtype = 'float32'; c.model.matmul_dtype = 'float32'  # as NOTES.md measured
cfg = vit.ViTConfig.from_config(c.model)
sc = step_lib.StepConfig.from_config(c, cfg.num_patches, 1000, 100, B)
mesh = step_lib.make_mesh()
params = jax.eval_shape(lambda k: vit.init_student(cfg, k), jax.random.key(0))
state = jax.eval_shape(lambda p: step_lib.init_state(p, 1, cfg.out_dim, sc), params)
step = step_lib.jit_train_step(step_lib.make_train_step(cfg, sc), mesh)
toks = jax.ShapeDtypeStruct((B, cfg.num_patches, cfg.embed_dim), np.float32)
ids = jax.ShapeDtypeStruct((B,), np.int32)
t = time.perf_counter()
comp = step.lower(state, toks, ids, jax.random.key(1)).compile()
ma = comp.memory_analysis(); ca = comp.cost_analysis()
print(os.environ.get('XLA_FLAGS', '-'), f'temp {ma.temp_size_in_bytes/1e6:.0f} MB args {ma.argument_size_in_bytes/1e6:.0f} MB GFLOP {ca["flops"]/1e9:.1f} compile {time.perf_counter()-t:.1f}s')
