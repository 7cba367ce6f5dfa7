"""Several processes on one machine (CPU devices, gloo collectives), as a multi-host pod would run.

The same tiny training run on one process of 2 devices and on 2 processes of 2 devices each, with the
sequence split over a context axis that spans both processes (each process loads the same rows and keeps its
half of the length, `sharding.host_share`): the losses agree. Likewise RL (run_rl) data-parallel over both
processes against one.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(worker, num, mesh, workdir, result):
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, worker), str(i), str(num), port, mesh,
                               str(workdir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(num)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    with open(os.path.join(workdir, result)) as f:
        return json.load(f)


@pytest.mark.slow  # two processes compile the tiny step (about a minute)
def test_context_axis_across_processes_matches_one_process(tmp_path):
    one = _run("train_worker.py", 1, "context=2", tmp_path / "one", "losses.json")
    two = _run("train_worker.py", 2, "context=4", tmp_path / "two", "losses.json")
    assert sorted(one) == sorted(two) == ["1", "2", "3"]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-4), (step, one, two)


@pytest.mark.slow  # two processes compile sampling, eval and the RL step (about two minutes)
def test_rl_across_processes_matches_one_process(tmp_path):
    """run_rl on a data=4 mesh over 2 processes (rollouts sampled and updates computed sharded over both, the
    sampled arrays gathered to every host) gives the one-process data=2 run's rollouts and updates."""
    one = _run("rl_worker.py", 1, "data=2", tmp_path / "one", "history.json")
    two = _run("rl_worker.py", 2, "data=4", tmp_path / "two", "history.json")
    assert [h["step"] for h in one] == [h["step"] for h in two] == [0, 1, 2]
    for a, b in zip(one[1:], two[1:]):
        for key in ("reward", "response_length", "entropy", "policy_loss", "grad_norm", "prob_corr"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), (key, a, b)
