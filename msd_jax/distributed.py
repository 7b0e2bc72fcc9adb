"""Several processes (hosts) training the server's model together on `jax.distributed`.

Started from config.distributed (coordinator 'HOST:PORT', num_processes, process_id: an explicit
start, by hand or from any launcher) or from config.multihost (JAX reads the launcher's
environment: SLURM, Open MPI, Cloud TPU). Every process runs the same program; the device mesh
spans every process's devices (msd/step.py `make_mesh`), each process loads only the rows of its
row groups and feeds its block of every global batch from them (training/batches.py, msd/step.py
`shard_batch`), Orbax saves and restores checkpoints cooperatively, and
only the writer (process 0) writes the work directory's metrics, TensorBoard events, records,
backbone description and report.

A process that stops (a crash, a killed job, a lost machine) stops sending heartbeats to the
coordination service; after config.distributed.heartbeat_timeout_s the others stop with an error
naming it instead of waiting in a collective for ever. docs/distributed.md has the launch recipes.
"""
from __future__ import annotations

import jax

# seconds a barrier waits for every process (config.distributed.timeout_s of the run)
_barrier_timeout_s = 300
# barriers passed so far: every process passes the same ones in the same order, and a barrier's
# name is used once
_barriers_passed = 0


def start(config) -> bool:
    """Starts jax.distributed as config.distributed / config.multihost ask; True when it did. Call
    before anything touches a device."""
    global _barrier_timeout_s
    d = config.distributed
    _barrier_timeout_s = int(d.timeout_s)
    timeouts = dict(initialization_timeout=int(d.timeout_s),
                    heartbeat_timeout_seconds=int(d.heartbeat_timeout_s),
                    shutdown_timeout_seconds=int(d.timeout_s))
    if d.coordinator:
        jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=int(d.num_processes),
                                   process_id=int(d.process_id), **timeouts)
        return True
    if config.multihost:
        jax.distributed.initialize(**timeouts)
        return True
    return False


def is_writer() -> bool:
    """Whether this process writes the shared files of the work directory (process 0 does)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reached the barrier `name` (nothing to wait for with one), for at
    most config.distributed.timeout_s. The coordination service's barrier, not a collective on the
    devices: a collective's first use opens the CPU collectives' connections, which give up after
    30 s, and a process still compiling can be later than that."""
    global _barriers_passed
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed  # noqa: PLC0415 (the service's client)
        jax_distributed.global_state.client.wait_at_barrier(f"{name}_{_barriers_passed}",
                                                            _barrier_timeout_s * 1000)
        _barriers_passed += 1


def finish() -> None:
    """The end of a run: every process waits for the others (the writer's files are complete when
    any process returns), then leaves the coordination service."""
    if jax.process_count() > 1:
        barrier("msd_jax_finish")
        jax.distributed.shutdown()
