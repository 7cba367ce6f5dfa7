"""Several processes on one machine (CPU devices, gloo collectives), as a multi-host pod would run.

The same tiny training run on one process of 2 devices and on 2 processes of 2 devices each, with the
sequence split over a context axis that spans both processes (each process loads the same rows and keeps its
half of the length, `sharding.host_share`): the losses agree.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost", "train_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(num, mesh, workdir):
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(num), port, mesh, str(workdir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(num)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    with open(os.path.join(workdir, "losses.json")) as f:
        return {int(k): v for k, v in json.load(f).items()}


@pytest.mark.slow  # two processes compile the tiny step (about a minute)
def test_context_axis_across_processes_matches_one_process(tmp_path):
    one = _run(1, "context=2", tmp_path / "one")
    two = _run(2, "context=4", tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-4), (step, one, two)
