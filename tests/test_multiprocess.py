"""Two processes on localhost (CPU devices, gloo collectives) run the sharded RL loop of
`multiprocess_worker.py` and must end where one process on one device ends."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import multiprocess_worker as worker
from graphgrpo_jax import checkpointing, mesh as mesh_lib

WORKER = pathlib.Path(worker.__file__)
NUM_PROCESSES = 2
TIMEOUT_S = 120


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """(output folder of the two-process job, final arrays of the single-process reference).

    The worker runs as processes 0 and 1 of one job, 2 CPU devices each, its coordinator bound to
    loopback; meanwhile this process computes the one-device reference.
    """
    out = tmp_path_factory.mktemp("multiprocess")
    port = free_loopback_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    logs = [out / f"process_{i}.log" for i in range(NUM_PROCESSES)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as sink:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), f"--process_id={i}", f"--num_processes={NUM_PROCESSES}",
                     f"--port={port}", f"--out={out}"],
                    cwd=WORKER.parents[1], env=env, stdout=sink, stderr=subprocess.STDOUT))
        mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
        reference = worker.host_arrays(worker.run_rl(mesh))
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {NUM_PROCESSES} worker processes did not finish within {TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {i} exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
    return out, reference


def test_two_processes_end_with_the_single_process_params(runs):
    out, reference = runs
    with np.load(out / "final.npz") as final:
        assert sorted(final.files) == sorted(reference)
        for name, expected in reference.items():
            np.testing.assert_allclose(final[name], expected, rtol=0, atol=1e-5, err_msg=name)
    initial = worker.host_arrays(jax.jit(worker.init_state)())
    moved = {name: np.max(np.abs(reference[name] - initial[name])) for name in initial}
    assert min(moved.values()) > 1e-3, f"some params or φ barely trained, the comparison shows little: {moved}"


def test_collective_checkpoint_restores_on_one_device(runs):
    out, _ = runs
    like = jax.eval_shape(worker.init_state)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = mesh_lib.with_shardings(like, jax.tree_util.tree_map(lambda _: device, like))
    with checkpointing.Checkpointer(str(out / "checkpoint")) as ckpt:
        restored = ckpt.restore_latest(target)
    assert restored is not None and restored.step == worker.NUM_STEPS
    arrays = worker.host_arrays(restored.state)
    with np.load(out / "final.npz") as final:
        for name in final.files:
            np.testing.assert_array_equal(arrays[name], final[name], err_msg=name)
