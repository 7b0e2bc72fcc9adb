"""Compile the msd_jax step of a config without running it and print XLA's memory analysis (temporary
buffer, arguments) and FLOPs: deterministic, so memory changes can be measured on a busy machine.

  python benchmarks/memory_probe.py demo 64

(msd_jax.msd.step.jit_train_step now passes the memory-optimised CPU scheduler as a compiler option,
which XLA_FLAGS cannot override; NOTES.md's "before" numbers are from the step before that change.)
"""
import os
import sys
import time

import stepbuild

name = sys.argv[1] if len(sys.argv) > 1 else 'demo'
B = int(sys.argv[2]) if len(sys.argv) > 2 else 64
bench = stepbuild.build_step(stepbuild.load_config(name), B, dtype='float32', matmul_dtype='float32',
                             steady=False, abstract=True)  # the float32 step NOTES.md measured
t = time.perf_counter()
comp = bench.compile()
ma = comp.memory_analysis(); ca = comp.cost_analysis()
print(os.environ.get('XLA_FLAGS', '-'), f'temp {ma.temp_size_in_bytes/1e6:.0f} MB args {ma.argument_size_in_bytes/1e6:.0f} MB GFLOP {ca["flops"]/1e9:.1f} compile {time.perf_counter()-t:.1f}s')
