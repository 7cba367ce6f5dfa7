"""Procedurally generated reasoning tasks whose answers can be checked exactly.

Every generator is a pure function of a `np.random.Generator` (plus keyword difficulty knobs, so
`functools.partial(addition, max_digits=6)` makes a harder variant). An `Example` carries the prompt,
the reference answer and a worked solution ending in "Answer: <answer>", which is the SFT target.
`verify` is the RL reward: an exact match of the extracted answer (whitespace-normalised only).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    task: str       # task name, a key of TASKS
    prompt: str     # the question, ending where the completion begins
    answer: str     # the reference final answer, e.g. "1234"
    solution: str   # worked steps then a final line "Answer: <answer>"; the SFT target text


# Tasks whose completion *is* the answer (no "Answer:" line): the RL smoke task wants a 1-token answer.
DIRECT_ANSWER_TASKS = frozenset({"mod_sum", "digit_count", "digit_max"})

_ANSWER_MARK = "Answer:"


def _normalise(text: str) -> str:
    return " ".join(text.split())


def extract_answer(completion: str) -> str | None:
    """The text after the last "Answer:", up to the end of its line, stripped; None if absent."""
    at = completion.rfind(_ANSWER_MARK)
    if at < 0:
        return None
    return completion[at + len(_ANSWER_MARK):].split("\n", 1)[0].strip()


def verify(example: Example, completion: str) -> bool:
    """Exact check of the completion's final answer against `example.answer`."""
    answer = extract_answer(completion)
    if answer is None and example.task in DIRECT_ANSWER_TASKS:
        answer = completion.split("\n", 1)[0]
    return answer is not None and _normalise(answer) == _normalise(example.answer)


def _with_answer(steps: list[str], answer: str) -> str:
    return "\n".join([*steps, f"{_ANSWER_MARK} {answer}"])


def _number(rng: np.random.Generator, min_digits: int, max_digits: int) -> int:
    """A uniform number of digits in [min_digits, max_digits], then a uniform number with that many."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    digits = int(rng.integers(min_digits, max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10 ** digits))


# ----------------------------------------------------------------------------------------- arithmetic


def addition(rng: np.random.Generator, *, min_digits: int = 1, max_digits: int = 3) -> Example:
    """a+b with one line per column, least significant first, showing the carry."""
    a, b = _number(rng, min_digits, max_digits), _number(rng, min_digits, max_digits)
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry, out = [], 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}, write {s % 10}, carry {s // 10}")
        out.append(str(s % 10))
        carry = s // 10
    if carry:
        steps.append(f"write carry {carry}")
        out.append(str(carry))
    answer = "".join(reversed(out))
    return Example("addition", f"{a}+{b}=?\n", answer, _with_answer(steps, answer))


def multiplication(rng: np.random.Generator, *, max_digits_a: int = 2, max_digits_b: int = 2) -> Example:
    """a*b as one partial product per digit of b, then their sum."""
    a, b = _number(rng, 1, max_digits_a), _number(rng, 1, max_digits_b)
    partials, steps = [], []
    for k, digit in enumerate(reversed(str(b))):
        place = int(digit) * 10 ** k
        partials.append(a * place)
        steps.append(f"{a}*{place}={a * place}")
    total = sum(partials)
    if len(partials) > 1:
        steps.append("+".join(str(p) for p in partials) + f"={total}")
    answer = str(total)
    return Example("multiplication", f"{a}*{b}=?\n", answer, _with_answer(steps, answer))


def mod_sum(rng: np.random.Generator, *, modulus: int = 10) -> Example:
    """(a+b) mod m with the bare answer as the whole completion (rl.md §7 smoke task)."""
    a, b = int(rng.integers(0, modulus)), int(rng.integers(0, modulus))
    answer = str((a + b) % modulus)
    return Example("mod_sum", f"{a}+{b} mod {modulus}=", answer, answer)


def digit_count(rng: np.random.Generator, *, num_digits: int = 6, alphabet: int = 4) -> Example:
    """How often a digit occurs in a string of digits, bare answer. 4**7 problems: unlike mod_sum, RL cannot
    memorise the training split, so what it learns must carry over to held-out problems."""
    digits = rng.integers(0, alphabet, num_digits)
    target = int(rng.integers(0, alphabet))
    answer = str(int((digits == target).sum()))
    return Example("digit_count", f"count {target} in {''.join(map(str, digits))}=", answer, answer)


def digit_max(rng: np.random.Generator, *, num_digits: int = 4) -> Example:
    """The largest digit of a string of digits, bare answer (the tiny preset learns it in ~100 SFT steps)."""
    digits = rng.integers(0, 10, num_digits)
    answer = str(int(digits.max()))
    return Example("digit_max", f"max {''.join(map(str, digits))}=", answer, answer)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def running_sum(rng: np.random.Generator, *, num_terms: int = 16, modulus: int = 10) -> Example:
    """A running sum mod m of lettered digits, one line per term: "b: 7, total 0" (RL at reasoning length).

    With 16 terms the worked solution is ~230 tokens (byte vocabulary), graded on the final total only. Each
    line looks a value up by its letter and adds it to the previous line's total, so one wrong total (a
    low-probability "fork" token of a half-trained policy) carries through to a wrong answer.
    """
    if not 1 <= num_terms <= len(_LETTERS):
        raise ValueError(f"num_terms must be in [1, {len(_LETTERS)}], got {num_terms}")
    if not 2 <= modulus <= 10:
        raise ValueError(f"modulus must be in [2, 10] (one digit per value), got {modulus}")
    values = [int(v) for v in rng.integers(0, modulus, num_terms)]
    steps, total = [], 0
    for letter, value in zip(_LETTERS, values):
        total = (total + value) % modulus
        steps.append(f"{letter}: {value}, total {total}")
    terms = " ".join(f"{letter}{value}" for letter, value in zip(_LETTERS, values))
    answer = str(total)
    return Example("running_sum", f"Sum mod {modulus}: {terms}\n", answer, _with_answer(steps, answer))


def digit_chain(rng: np.random.Generator, *, min_steps: int = 20, max_steps: int = 26) -> Example:
    """The chain x[k+1] = (x[k-1] + x[k]) mod 10 from two start digits, one line per step, counting down:
    "17: 3+5=8" (RL at reasoning length).

    With 20-26 steps the worked solution is 200-260 tokens (byte vocabulary), graded on the last digit only.
    Every line needs only the line before it (its second digit, its sum, its counter minus one) and a 100-entry
    sum table, so a small model can learn the step (a variant with a third, constant addend, a 1000-entry
    table, was still at 0.63-0.69 per sum digit after 400 SFT steps: docs/RESULTS.md 6.9b). The answer is right
    only if every step is, so one wrong sum (a low-probability "fork" token of a half-trained policy) fails it.
    """
    if not 1 <= min_steps <= max_steps <= 99:
        raise ValueError(f"need 1 <= min_steps <= max_steps <= 99, got {min_steps}, {max_steps}")
    x0, x1 = (int(v) for v in rng.integers(0, 10, 2))
    num_steps = int(rng.integers(min_steps, max_steps + 1))
    steps, (a, b) = [], (x0, x1)
    for k in range(num_steps, 0, -1):
        steps.append(f"{k}: {a}+{b}={(a + b) % 10}")
        a, b = b, (a + b) % 10
    answer = str(b)
    return Example("digit_chain", f"Chain mod 10: {x0} {x1}, {num_steps} steps\n", answer,
                   _with_answer(steps, answer))


# ------------------------------------------------------------------------------------------- logic


def _random_bool_tree(rng: np.random.Generator, depth: int):
    if depth == 0 or rng.random() < 0.25:
        return bool(rng.integers(0, 2))
    op = ("not", "and", "or")[int(rng.integers(0, 3))]
    if op == "not":
        return ("not", _random_bool_tree(rng, depth - 1))
    return (op, _random_bool_tree(rng, depth - 1), _random_bool_tree(rng, depth - 1))


def _render_bool(node, top: bool = True) -> str:
    # Binary sub-expressions are always parenthesised, so `not` chains are the only precedence the reader
    # (and Python's eval, used by the tests) has to apply.
    if isinstance(node, bool):
        return str(node)
    if node[0] == "not":
        return "not " + _render_bool(node[1], top=False)
    text = f"{_render_bool(node[1], top=False)} {node[0]} {_render_bool(node[2], top=False)}"
    return text if top else f"({text})"


def _reduce_once(node):
    """Evaluates the leftmost operation whose operands are all literals."""
    if isinstance(node, bool):
        return node
    children = node[1:]
    for i, child in enumerate(children):
        if not isinstance(child, bool):
            new_children = list(children)
            new_children[i] = _reduce_once(child)
            return (node[0], *new_children)
    if node[0] == "not":
        return not children[0]
    return (children[0] and children[1]) if node[0] == "and" else (children[0] or children[1])


def boolean_expressions(rng: np.random.Generator, *, depth: int = 2) -> Example:
    """A random and/or/not expression reduced one operation per line (BBH-style)."""
    tree = _random_bool_tree(rng, depth)
    while isinstance(tree, bool):  # at least one operation
        tree = _random_bool_tree(rng, depth)
    steps = []
    node = tree
    while not isinstance(node, bool):
        node = _reduce_once(node)
        steps.append("= " + _render_bool(node))
    answer = str(node)
    return Example("boolean_expressions", f"{_render_bool(tree)} is\n", answer, _with_answer(steps, answer))


_BRACKETS = ("()", "[]", "{}", "<>")


def dyck_language(rng: np.random.Generator, *, num_types: int = 3, min_len: int = 4,
                  max_len: int = 10) -> Example:
    """Completes an unbalanced bracket prefix; one line per symbol shows the open stack."""
    if not 1 <= num_types <= len(_BRACKETS):
        raise ValueError(f"num_types must be in [1, {len(_BRACKETS)}], got {num_types}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    length = int(rng.integers(min_len, max_len + 1))
    stack, seq, steps = [], [], []
    for i in range(length):
        remaining = length - i
        # Closing is allowed only if at least one bracket can still be left open at the end.
        can_close = len(stack) >= 2 or (len(stack) == 1 and remaining >= 2)
        if can_close and rng.random() < 0.5:
            symbol = _BRACKETS[stack.pop()][1]
        else:
            kind = int(rng.integers(0, num_types))
            stack.append(kind)
            symbol = _BRACKETS[kind][0]
        seq.append(symbol)
        steps.append(f"{symbol} {''.join(_BRACKETS[k][0] for k in stack) or '-'}")
    answer = "".join(_BRACKETS[k][1] for k in reversed(stack))
    return Example("dyck_language", f"Close: {''.join(seq)}\n", answer, _with_answer(steps, answer))


_CATEGORIES = {
    "fruits": ("apple", "banana", "orange", "peach", "plum", "grape", "lemon", "mango"),
    "animals": ("cat", "dog", "cow", "goat", "rabbit", "snake", "horse", "duck"),
    "vegetables": ("carrot", "onion", "cabbage", "leek", "turnip", "yam", "radish", "garlic"),
    "instruments": ("piano", "violin", "drum", "flute", "trumpet", "guitar", "harp", "cello"),
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")


def _noun_phrase(noun: str, count: int) -> str:
    if count == 1:
        return ("an " if noun[0] in "aeiou" else "a ") + noun
    return f"{_NUMBER_WORDS[count]} {_plural(noun)}"


def object_counting(rng: np.random.Generator, *, min_items: int = 2, max_items: int = 5,
                    max_count: int = 3) -> Example:
    """Counts the objects of one category in a list of mixed objects, one line per listed item."""
    if not 1 <= min_items <= max_items <= 8:
        raise ValueError(f"need 1 <= min_items <= max_items <= 8, got {min_items}, {max_items}")
    if not 1 <= max_count < len(_NUMBER_WORDS):
        raise ValueError(f"max_count must be in [1, {len(_NUMBER_WORDS) - 1}], got {max_count}")
    names = sorted(_CATEGORIES)
    target = names[int(rng.integers(0, len(names)))]
    pool = [(noun, cat) for cat in names for noun in _CATEGORIES[cat]]
    num_items = int(rng.integers(min_items, max_items + 1))
    picks = [pool[int(i)] for i in rng.choice(len(pool), size=num_items, replace=False)]
    if all(cat != target for _, cat in picks):  # make the question non-trivial: at least one match
        nouns = _CATEGORIES[target]
        picks[int(rng.integers(0, num_items))] = (nouns[int(rng.integers(0, len(nouns)))], target)
    counts = [int(rng.integers(1, max_count + 1)) for _ in picks]
    phrases = [_noun_phrase(noun, c) for (noun, _), c in zip(picks, counts)]
    listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + ", and " + phrases[-1]
    prompt = f"I have {listing}. How many {target} do I have?\n"
    steps, total = [], 0
    for phrase, (_, cat), c in zip(phrases, picks, counts):
        if cat == target:
            total += c
            steps.append(f"{phrase}: +{c}, total {total}")
        else:
            steps.append(f"{phrase}: not {target}")
    answer = str(total)
    return Example("object_counting", prompt, answer, _with_answer(steps, answer))


# ---------------------------------------------------------------------------------- long context


def retrieval(rng: np.random.Generator, *, num_pairs: int = 8, key_len: int = 4,
              value_digits: int = 4) -> Example:
    """Key-value lines then a query for one key; `num_pairs` sets the context length."""
    if num_pairs < 1 or 26 ** key_len < 2 * num_pairs:
        raise ValueError(f"num_pairs={num_pairs} needs num_pairs >= 1 and 26**key_len >= 2*num_pairs; "
                         "raise key_len")
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    keys: list[str] = []
    seen = set()
    while len(keys) < num_pairs:
        key = "".join(letters[rng.integers(0, 26, size=key_len)])
        if key not in seen:
            seen.add(key)
            keys.append(key)
    values = ["".join(str(d) for d in rng.integers(0, 10, size=value_digits)) for _ in keys]
    query = int(rng.integers(0, num_pairs))
    lines = "".join(f"{k}: {v}\n" for k, v in zip(keys, values))
    prompt = f"{lines}What is the value of {keys[query]}?\n"
    answer = values[query]
    return Example("retrieval", prompt, answer, _with_answer([f"{keys[query]}: {answer}"], answer))


_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
           "There and back again.")


def passkey(rng: np.random.Generator, *, filler_len: int = 128, digits: int = 5) -> Example:
    """A passkey hidden at a random sentence boundary of about `filler_len` characters of filler."""
    if filler_len < 0 or digits < 1:
        raise ValueError(f"need filler_len >= 0 and digits >= 1, got {filler_len}, {digits}")
    sentences, size = [], 0
    while size < filler_len:
        sentences.append(_FILLER[len(sentences) % len(_FILLER)])
        size += len(sentences[-1]) + 1
    key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
    at = int(rng.integers(0, len(sentences) + 1))
    sentences.insert(at, f"The passkey is {key}. Remember it.")
    prompt = ("There is a passkey hidden in the text below. Remember it.\n" + " ".join(sentences) +
              "\nWhat is the passkey?\n")
    return Example("passkey", prompt, key, _with_answer([f"The passkey is {key}."], key))


TASKS: dict[str, Callable[[np.random.Generator], Example]] = {
    "addition": addition,
    "multiplication": multiplication,
    "mod_sum": mod_sum,
    "digit_count": digit_count,
    "digit_max": digit_max,
    "running_sum": running_sum,
    "digit_chain": digit_chain,
    "boolean_expressions": boolean_expressions,
    "dyck_language": dyck_language,
    "object_counting": object_counting,
    "retrieval": retrieval,
    "passkey": passkey,
}
