"""Scalar rewards: code execution, answer format, and the built-in verifiable tasks."""

import re
from typing import Sequence

from m1_jax.rl.rewards import sandbox

_ANSWER_LINE = re.compile(r"^Answer:[ \t]*(\S.*)$")
_ANSWER_PREFIX = re.compile(r"^\s*Answer\s*:", re.IGNORECASE)


def code_reward(program: str, tests: str | Sequence[str], *,
                config: sandbox.SandboxConfig = sandbox.SandboxConfig()) -> float:
    """1.0 if `program` followed by the assert-style `tests` runs to exit status 0 in the sandbox, else 0.0."""
    if not isinstance(tests, str):
        tests = "\n".join(tests)
    if not tests.strip():
        raise ValueError("tests are empty; a program with no tests would always be rewarded")
    result = sandbox.run_python(program + "\n\n" + tests + "\n", config=config)
    return 1.0 if result.passed else 0.0


def format_reward(completion: str, eos: str | None = None) -> float:
    """1.0 if the completion ends with exactly one well-formed line "Answer: <something>", else 0.0.

    With `eos` given, text after its first occurrence is ignored (the completion ends at EOS); trailing
    whitespace is ignored. Any other line that starts like an answer line ("answer :", " Answer:") makes the
    format wrong, so a model cannot hedge with several answers.
    """
    if eos:
        completion = completion.split(eos, 1)[0]
    lines = completion.rstrip().split("\n")
    if not _ANSWER_LINE.match(lines[-1]):
        return 0.0
    if any(_ANSWER_PREFIX.match(line) for line in lines[:-1]):
        return 0.0
    return 1.0


def task_reward(example, completion: str) -> float:
    """1.0 if `m1_jax.data.tasks.verify` accepts the completion for this example, else 0.0."""
    # Imported here so the rest of the rewards work without the data package.
    from m1_jax.data import tasks  # pylint: disable=g-import-not-at-top
    return 1.0 if tasks.verify(example, completion) else 0.0
