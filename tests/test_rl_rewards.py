"""Tests of the sandboxed code-execution reward and the format/task rewards."""

import os
import signal
import socket
import textwrap

import pytest

from m1_jax.rl.rewards import sandbox
from m1_jax.rl.rewards import scoring

FAST = sandbox.SandboxConfig(timeout_s=1.5, memory_bytes=256 * 2**20)
HAS_NETNS = sandbox._unshare_prefix() is not None  # pylint: disable=protected-access


def test_correct_code_passes_and_wrong_code_fails():
    program = textwrap.dedent("""
      def add(a, b):
          return a + b
      """)
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
    assert scoring.code_reward(program, tests, config=FAST) == 1.0
    assert scoring.code_reward(program.replace("a + b", "a - b"), tests, config=FAST) == 0.0
    assert scoring.code_reward("def add(a, b) return a", tests, config=FAST) == 0.0  # syntax error
    with pytest.raises(ValueError, match="empty"):
        scoring.code_reward(program, [], config=FAST)


def test_result_fields_stdout_stdin_and_exit_status():
    result = sandbox.run_python("import sys\nprint(sys.stdin.read().upper())\nprint('e', file=sys.stderr)",
                                stdin="hello", config=FAST)
    assert result.passed and not result.timed_out and not result.killed and result.returncode == 0
    assert result.stdout == "HELLO\n" and result.stderr == "e\n"
    result = sandbox.run_python("raise SystemExit(3)", config=FAST)
    assert not result.passed and result.returncode == 3 and not result.killed


def test_runaway_loop_is_killed_by_wall_clock_timeout():
    config = sandbox.SandboxConfig(timeout_s=1.0, cpu_time_s=30)
    result = sandbox.run_python("import time\nwhile True:\n    time.sleep(0.01)", config=config)
    assert result.timed_out and result.killed and not result.passed
    assert result.returncode == -signal.SIGKILL
    assert result.duration_s < 3.0


def test_cpu_time_limit_kills_busy_loop():
    config = sandbox.SandboxConfig(timeout_s=10.0, cpu_time_s=1)
    result = sandbox.run_python("while True:\n    pass", config=config)
    assert result.killed and not result.timed_out and not result.passed
    assert result.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert result.duration_s < 5.0


def test_memory_hog_is_stopped():
    # A generous wall clock so that, on a loaded CI machine, the memory limit (not the timeout) is what stops it.
    config = sandbox.SandboxConfig(timeout_s=20.0, memory_bytes=256 * 2**20)
    for program in ["x = bytearray(2 ** 31)", "x = []\nwhile True:\n    x.append(bytearray(2 ** 20))"]:
        result = sandbox.run_python(program, config=config)
        assert not result.passed and not result.timed_out, program
        assert result.killed or "MemoryError" in result.stderr, (program, result)


def _connect_program(port):
    return textwrap.dedent(f"""
      import socket
      s = socket.create_connection(("127.0.0.1", {port}), timeout=0.5)
      s.sendall(b"escaped")
      print("CONNECTED")
      """)


@pytest.mark.parametrize("config", [
    FAST,  # both layers
    sandbox.SandboxConfig(timeout_s=1.5, network_namespace=False),  # audit hook only
    pytest.param(sandbox.SandboxConfig(timeout_s=1.5, audit_hooks=False, require_network_namespace=True),
                 marks=pytest.mark.skipif(not HAS_NETNS, reason="`unshare -n` unavailable on this host")),
], ids=["hook+netns", "hook", "netns"])
def test_network_is_blocked(config):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        result = sandbox.run_python(_connect_program(server.getsockname()[1]), config=config)
        assert not result.passed and "CONNECTED" not in result.stdout
        with pytest.raises(socket.timeout):
            server.accept()  # nobody reached the host's loopback
    if config.audit_hooks:
        assert "sandbox: socket" in result.stderr
    if config.network_namespace:
        assert result.network_isolated == HAS_NETNS


def test_unsandboxed_control_connects():
    # The same program outside the sandbox reaches the server, so the blocking test above can fail.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(2.0)
        exec(_connect_program(server.getsockname()[1]), {})  # pylint: disable=exec-used
        conn, _ = server.accept()
        assert conn.recv(16) == b"escaped"
        conn.close()


def test_no_writes_outside_work_dir_and_work_dir_is_deleted(tmp_path):
    target = tmp_path / "escaped.txt"
    for program in [f"open({str(target)!r}, 'w').write('x')",
                    f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
                    f"import shutil\nopen('a', 'w').write('x')\nshutil.copyfile('a', {str(target)!r})",
                    f"import os\nos.rename('../solution.py', {str(target)!r})"]:
        result = sandbox.run_python(program, config=FAST)
        assert not result.passed and not target.exists(), program
    # Control: without the audit hook the same write succeeds (we run as root), so the loop above can fail.
    control = sandbox.run_python(f"open({str(target)!r}, 'w').write('x')",
                                 config=sandbox.SandboxConfig(timeout_s=1.5, audit_hooks=False))
    assert control.passed == target.exists()
    (tmp_path / "keep.txt").write_text("precious")
    result = sandbox.run_python(f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})", config=FAST)
    assert not result.passed and (tmp_path / "keep.txt").read_text() == "precious"
    # Inside its own directory the program may write; the directory is gone afterwards.
    result = sandbox.run_python(
        "import os\nopen('out.txt', 'w').write('ok')\nprint(os.getcwd())\nprint(open('out.txt').read())",
        config=FAST)
    assert result.passed, result.stderr
    work_dir, content = result.stdout.split()
    assert content == "ok" and not os.path.exists(work_dir)


def test_no_subprocess_and_env_is_stripped(monkeypatch):
    monkeypatch.setenv("M1_SECRET_TOKEN", "do-not-leak")
    result = sandbox.run_python("import os\nprint(sorted(os.environ))", config=FAST)
    assert result.passed and "M1_SECRET_TOKEN" not in result.stdout and "do-not-leak" not in result.stdout
    result = sandbox.run_python("import subprocess\nsubprocess.run(['echo', 'hi'])", config=FAST)
    assert not result.passed and "not allowed" in result.stderr and "hi" not in result.stdout
    result = sandbox.run_python("import os\nos.system('echo hi')", config=FAST)
    assert not result.passed and "hi" not in result.stdout


def test_output_is_capped():
    config = sandbox.SandboxConfig(timeout_s=1.5, max_output_bytes=4096)
    result = sandbox.run_python("while True:\n    print('x' * 1000)", config=config)
    assert not result.passed and 0 < len(result.stdout) <= 4096


@pytest.mark.parametrize("completion,expected", [
    ("Let me think.\n2 + 3 = 5\nAnswer: 5", 1.0),
    ("Answer: 5", 1.0),
    ("steps\nAnswer: 5\n\n  ", 1.0),  # trailing whitespace before EOS is fine
    ("steps\nAnswer: 5<eos>garbage after eos\nAnswer: 6", 1.0),
    ("steps\nAnswer: 4\nAnswer: 5", 0.0),  # two answers
    ("steps\nanswer : 4\nAnswer: 5", 0.0),  # a hedged second answer line
    ("steps\nAnswer:", 0.0),  # empty answer
    ("steps\nAnswer:   ", 0.0),
    ("Answer: 5\nbecause reasons", 0.0),  # not the final line
    ("The answer is 5", 0.0),
    ("", 0.0),
    ("steps\n Answer: 5", 0.0),  # not at line start
])
def test_format_reward(completion, expected):
    assert scoring.format_reward(completion, eos="<eos>") == expected


def test_task_reward_uses_data_tasks_verify():
    tasks = pytest.importorskip("m1_jax.data.tasks")
    example = tasks.Example(task="addition", prompt="17+25=", answer="42",
                            solution="7+5+0=12, write 2, carry 1\n1+2+1=4, write 4, carry 0\nAnswer: 42")
    assert scoring.task_reward(example, example.solution) == 1.0
    assert scoring.task_reward(example, "1+2+1=4\nAnswer: 41") == 0.0
    assert scoring.task_reward(example, "no answer here") == 0.0
