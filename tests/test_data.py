"""Tests for m1_jax/data: tokenizers, verifiable tasks, packing and the grain pipeline."""

import json
import os
import re

import numpy as np
import pytest

from m1_jax.data import packing
from m1_jax.data import pipeline
from m1_jax.data import sources
from m1_jax.data import tasks
from m1_jax.data import tokenizer as tokenizer_lib

UNICODE_TEXTS = ["hello world", "héllo wörld ✓", "日本語のテキスト", "emoji 🙂🚀 and\ttabs\nnewlines", ""]


def _examples(task_fn, n, seed=0):
    rng = np.random.default_rng(seed)
    return [task_fn(rng) for _ in range(n)]


# ------------------------------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_round_trip_and_specials():
    tok = tokenizer_lib.load_tokenizer(None)
    assert tokenizer_lib.load_tokenizer("byte").vocab_size == 259
    assert tok.vocab_size == 259
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert min(tok.pad_id, tok.bos_id, tok.eos_id) >= 256 and max(tok.pad_id, tok.bos_id, tok.eos_id) < 259
    for text in UNICODE_TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))  # independent reference: Python's utf-8 codec
        assert tok.decode(ids) == text
        # Specials anywhere are dropped.
        assert tok.decode([tok.bos_id, *ids[:3], tok.pad_id, *ids[3:], tok.eos_id]) == text
    # A cut multi-byte character decodes with the replacement character instead of raising.
    assert tok.decode(list("é".encode("utf-8"))[:1]) == "\ufffd"


def _write_tiny_bpe(path, special_tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in special_tokens else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat", "the dog ate the cat's food", "12+34=46"] * 5, trainer)
    tok.save(str(path))
    return tok


def test_hf_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.json"
    raw = _write_tiny_bpe(path, ["<pad>", "<s>", "</s>", "<unk>"])
    tok = tokenizer_lib.load_tokenizer(str(path))
    assert isinstance(tok, tokenizer_lib.HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (raw.token_to_id("<pad>"), raw.token_to_id("<s>"),
                                                    raw.token_to_id("</s>"))
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    for text in UNICODE_TEXTS:
        ids = tok.encode(text)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat")  # merges learned
    # A directory holding tokenizer.json works too.
    assert tokenizer_lib.load_tokenizer(str(tmp_path)).eos_id == tok.eos_id


def test_hf_tokenizer_config_and_fallbacks(tmp_path):
    path = tmp_path / "tokenizer.json"
    raw = _write_tiny_bpe(path, ["<|endoftext|>", "<beg>", "<end>"])
    # No PAD or BOS among the known spellings: both fall back to EOS.
    tok = tokenizer_lib.HFTokenizer(str(path))
    assert tok.eos_id == raw.token_to_id("<|endoftext|>") == tok.bos_id == tok.pad_id
    # tokenizer_config.json beside the file names the specials.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<beg>"}, "eos_token": "<end>"}))
    tok = tokenizer_lib.HFTokenizer(str(path))
    assert (tok.bos_id, tok.eos_id) == (raw.token_to_id("<beg>"), raw.token_to_id("<end>"))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer_lib.HFTokenizer(str(path), eos_token="<nope>")


def test_hf_tokenizer_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))


# --------------------------------------------------------------------------------------------- tasks


def _corrupt(answer: str) -> str:
    if answer in ("True", "False"):
        return "False" if answer == "True" else "True"
    if answer.isdigit():
        return str(int(answer) + 1)
    return answer + ")"


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_solution_verifies_and_corruption_fails(name):
    examples = _examples(tasks.TASKS[name], 60, seed=7)
    for ex in examples:
        assert ex.task == name
        assert ex.solution.endswith(ex.answer)
        assert tasks.verify(ex, ex.solution), ex
        assert tasks.verify(ex, ex.solution + "  \n")  # trailing whitespace is not an error
        wrong = ex.solution[:len(ex.solution) - len(ex.answer)] + _corrupt(ex.answer)
        assert not tasks.verify(ex, wrong), (ex, wrong)
        assert not tasks.verify(ex, "")
        if name not in tasks.DIRECT_ANSWER_TASKS:
            assert ex.solution.split("\n")[-1] == f"Answer: {ex.answer}"
            assert tasks.verify(ex, ex.solution.replace("Answer: ", "Answer:   "))
            assert not tasks.verify(ex, ex.answer)  # the "Answer:" line is required
    # Pure functions of the generator: the same seed gives the same problems; the problems vary.
    assert _examples(tasks.TASKS[name], 60, seed=7) == examples
    assert len({ex.prompt for ex in examples}) > 5


def test_extract_answer_and_whitespace():
    assert tasks.extract_answer("no answer here") is None
    assert tasks.extract_answer("Answer: 3\nsteps\nAnswer:  12 \nAfter") == "12"
    assert tasks.extract_answer("Answer:") == ""
    ex = tasks.Example("retrieval", "q\n", "a b", "Answer: a b")
    assert tasks.verify(ex, "x\nAnswer:   a   b  ")
    assert not tasks.verify(ex, "Answer: ab")


def test_arithmetic_against_python():
    for ex in _examples(tasks.TASKS["addition"], 200):
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=\?\n", ex.prompt).groups())
        assert int(ex.answer) == a + b
        # The written column digits, most significant last, spell the answer.
        written = re.findall(r"write (?:carry )?(\d)", ex.solution)
        assert "".join(reversed(written)) == ex.answer
    for ex in _examples(lambda r: tasks.addition(r, min_digits=5, max_digits=9), 100):
        a, b = map(int, ex.prompt[:-3].split("+"))
        assert int(ex.answer) == a + b and len(str(a)) >= 5
    for ex in _examples(lambda r: tasks.multiplication(r, max_digits_a=3, max_digits_b=3), 200):
        a, b = map(int, re.fullmatch(r"(\d+)\*(\d+)=\?\n", ex.prompt).groups())
        assert int(ex.answer) == a * b
        for x, y, p in re.findall(r"^(\d+)\*(\d+)=(\d+)$", ex.solution, flags=re.M):
            assert int(x) * int(y) == int(p)
    for ex in _examples(tasks.TASKS["mod_sum"], 100):
        a, b = map(int, re.fullmatch(r"(\d)\+(\d) mod 10=", ex.prompt).groups())
        assert ex.answer == ex.solution == str((a + b) % 10)
    for ex in _examples(lambda r: tasks.mod_sum(r, modulus=7), 50):
        a, b = map(int, re.fullmatch(r"(\d)\+(\d) mod 7=", ex.prompt).groups())
        assert ex.answer == str((a + b) % 7)


def test_digit_tasks_match_a_python_count_and_max():
    answers = set()
    for ex in _examples(tasks.TASKS["digit_count"], 200):
        target, digits = re.fullmatch(r"count (\d) in (\d{6})=", ex.prompt).groups()
        assert ex.answer == ex.solution == str(digits.count(target)) and set(digits) <= set("0123")
        answers.add(ex.answer)
    assert {"0", "1", "2", "3"} <= answers
    for ex in _examples(lambda r: tasks.digit_max(r, num_digits=7), 100):
        digits = re.fullmatch(r"max (\d{7})=", ex.prompt).group(1)
        assert ex.answer == ex.solution == max(digits)
        assert tasks.verify(ex, ex.answer + "\n") and not tasks.verify(ex, str((int(ex.answer) + 1) % 10))


def test_running_sum_against_parsed_prompt():
    tok = tokenizer_lib.ByteTokenizer()
    lengths = []
    for ex in _examples(tasks.TASKS["running_sum"], 100):
        body, = re.fullmatch(r"Sum mod 10: ((?:[a-p]\d ?){16})\n", ex.prompt).groups()
        terms = body.split()
        assert [t[0] for t in terms] == list("abcdefghijklmnop")
        values = [int(t[1]) for t in terms]
        assert ex.answer == str(sum(values) % 10)
        lines = ex.solution.split("\n")[:-1]
        assert len(lines) == 16
        for k, line in enumerate(lines):  # every partial total, against numpy's cumulative sum
            assert line == f"{terms[k][0]}: {values[k]}, total {np.cumsum(values)[k] % 10}"
        lengths.append(len(tok.encode(ex.solution)))
    assert min(lengths) >= 200  # "hundreds of tokens" of worked steps with the byte tokenizer
    for ex in _examples(lambda r: tasks.running_sum(r, num_terms=5, modulus=7), 50):
        values = [int(t[1]) for t in ex.prompt.split(": ", 1)[1].split()]
        assert len(values) == 5 and max(values) < 7 and ex.answer == str(sum(values) % 7)
    with pytest.raises(ValueError, match="num_terms"):
        tasks.running_sum(np.random.default_rng(0), num_terms=27)
    with pytest.raises(ValueError, match="modulus"):
        tasks.running_sum(np.random.default_rng(0), modulus=11)


def test_digit_chain_against_parsed_prompt():
    tok = tokenizer_lib.ByteTokenizer()
    lengths, answers = [], set()
    for ex in _examples(tasks.TASKS["digit_chain"], 200):
        x0, x1, n = map(int, re.fullmatch(r"Chain mod 10: (\d) (\d), (\d+) steps\n", ex.prompt).groups())
        assert 20 <= n <= 26
        seq = [x0, x1]  # the whole chain first, then the lines are checked against it
        while len(seq) < n + 2:
            seq.append((seq[-2] + seq[-1]) % 10)
        lines = ex.solution.split("\n")
        assert lines[-1] == f"Answer: {seq[-1]}" and ex.answer == str(seq[-1])
        assert lines[:-1] == [f"{n - k}: {seq[k]}+{seq[k + 1]}={seq[k + 2]}" for k in range(n)]
        assert tasks.verify(ex, ex.solution) and not tasks.verify(ex, f"Answer: {(seq[-1] + 1) % 10}")
        lengths.append(len(tok.encode(ex.solution)))
        answers.add(ex.answer)
    assert min(lengths) >= 200 and max(lengths) <= 262 and len(answers) == 10
    ex = tasks.digit_chain(np.random.default_rng(1), min_steps=3, max_steps=3)
    assert [line.split(":")[0] for line in ex.solution.split("\n")] == ["3", "2", "1", "Answer"]
    with pytest.raises(ValueError, match="min_steps"):
        tasks.digit_chain(np.random.default_rng(0), min_steps=5, max_steps=4)


def test_boolean_expressions_match_python_eval():
    for ex in _examples(lambda r: tasks.boolean_expressions(r, depth=3), 200):
        expr = ex.prompt[:-len(" is\n")]
        assert ex.answer == str(eval(expr))  # pylint: disable=eval-used
        steps = [line[2:] for line in ex.solution.split("\n")[:-1]]
        assert all(str(eval(s)) == ex.answer for s in steps)  # every reduction keeps the value
        assert steps[-1] == ex.answer


def _balanced(text: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{", ">": "<"}
    stack = []
    for c in text:
        if c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return False
        else:
            stack.append(c)
    return not stack


def test_dyck_completion_is_the_unique_balancing_suffix():
    for ex in _examples(lambda r: tasks.dyck_language(r, num_types=4, max_len=16), 200):
        seq = re.fullmatch(r"Close: (\S+)\n", ex.prompt).group(1)
        assert ex.answer and set(ex.answer) <= set(")]}>")
        assert _balanced(seq + ex.answer)
        assert not _balanced(seq + ex.answer[:-1])


def test_object_counting_against_parsed_prompt():
    plural_to_noun = {}
    category_of = {}
    for cat, nouns in tasks._CATEGORIES.items():  # pylint: disable=protected-access
        for noun in nouns:
            category_of[noun] = cat
            plural_to_noun[noun + "s"] = plural_to_noun[noun + "es"] = noun
    words = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5}
    for ex in _examples(lambda r: tasks.object_counting(r, max_items=6, max_count=5), 200):
        listing, target = re.fullmatch(r"I have (.*)\. How many (\w+) do I have\?\n", ex.prompt).groups()
        total = 0
        for phrase in re.split(r", and |, ", listing):
            count_word, noun = phrase.split(" ")
            noun = noun if words[count_word] == 1 else plural_to_noun[noun]
            total += words[count_word] * (category_of[noun] == target)
        assert ex.answer == str(total) and total >= 1


def test_retrieval_and_passkey():
    for ex in _examples(lambda r: tasks.retrieval(r, num_pairs=20), 50):
        lines = ex.prompt.strip().split("\n")
        table = dict(line.split(": ") for line in lines[:-1])
        assert len(table) == 20
        key = re.fullmatch(r"What is the value of (\w+)\?", lines[-1]).group(1)
        assert ex.answer == table[key]
    short = _examples(tasks.TASKS["passkey"], 20)
    long = _examples(lambda r: tasks.passkey(r, filler_len=4000), 20)
    for ex in short + long:
        assert re.findall(r"The passkey is (\d+)\.", ex.prompt) == [ex.answer]
    assert min(len(e.prompt) for e in long) > 4000 > max(len(e.prompt) for e in short)


# ------------------------------------------------------------------------------------------- packing

P = 99  # pad id for the hand-built packing cases


def _doc(tokens, trainable=None):
    tokens = np.array(tokens, np.int32)
    trainable = np.ones(len(tokens), bool) if trainable is None else np.array(trainable, bool)
    return packing.Document(tokens, trainable)


def test_packing_hand_built():
    docs = [_doc([1, 2, 3]), _doc([4, 5]), _doc([6, 7, 8, 9], [0, 0, 1, 1]), _doc([20, 21, 22])]
    batches, stats = packing.pack_documents(docs, batch_size=2, seq_len=6, pad_id=P)
    assert len(batches) == 2 and stats.documents == 4 and stats.split == stats.truncated == 0
    b = batches[0]
    np.testing.assert_array_equal(b["tokens"], [[1, 2, 3, 4, 5, P], [6, 7, 8, 9, P, P]])
    np.testing.assert_array_equal(b["targets"], [[2, 3, P, 5, P, P], [7, 8, 9, P, P, P]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0]])
    b = batches[1]
    np.testing.assert_array_equal(b["tokens"], [[20, 21, 22, P, P, P], [P] * 6])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 0, 0, 0], [0] * 6])
    for key, dtype in [("tokens", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                       ("positions", np.int32), ("loss_mask", np.float32)]:
        assert b[key].dtype == dtype


def _trained_pairs(batches):
    pairs = []
    for b in batches:
        for r, t in zip(*np.nonzero(b["loss_mask"])):
            pairs.append((int(b["tokens"][r, t]), int(b["targets"][r, t])))
    return pairs


def test_packing_split_and_truncate():
    long_doc = _doc(np.arange(100, 111))  # 11 tokens, seq_len 4
    batches, stats = packing.pack_documents([long_doc], batch_size=1, seq_len=4, pad_id=P)
    assert stats.split == 1 and stats.dropped_tokens == 0
    # Every next-token pair of the document is trained exactly once, in order.
    assert _trained_pairs(batches) == [(100 + i, 101 + i) for i in range(10)]
    batches, stats = packing.pack_documents([long_doc, _doc([1, 2])], batch_size=1, seq_len=4, pad_id=P,
                                            overflow="truncate")
    assert (stats.documents, stats.truncated, stats.dropped_tokens) == (2, 1, 7)
    assert _trained_pairs(batches) == [(100, 101), (101, 102), (102, 103), (1, 2)]
    with pytest.raises(ValueError, match="overflow"):
        packing.split_document(long_doc, 4, "drop")


def test_packing_random_documents_no_cross_document_targets():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 40, size=60)
    docs = [_doc(rng.integers(0, 50, size=n), rng.random(n) < 0.7) for n in lengths]
    seq_len = 32
    batches, stats = packing.pack_documents(docs, batch_size=3, seq_len=seq_len, pad_id=P)
    rebuilt = []
    for b in batches:
        seg, tok, tgt, pos, mask = (b[k] for k in ("segment_ids", "tokens", "targets", "positions", "loss_mask"))
        for r in range(seg.shape[0]):
            for t in range(seq_len):
                if mask[r, t]:
                    assert t + 1 < seq_len and seg[r, t] == seg[r, t + 1] != 0 and tgt[r, t] == tok[r, t + 1]
                if seg[r, t] == 0:
                    assert tok[r, t] == P and mask[r, t] == 0
            for s in range(1, seg[r].max() + 1):
                where = np.nonzero(seg[r] == s)[0]
                assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
                np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))
                rebuilt.append(tok[r, where])
    # Nothing lost: chunks of split documents rejoin (dropping the shared token) to the inputs in order.
    expected = []
    for d in docs:
        expected.extend(c.tokens for c in packing.split_document(d, seq_len))
    assert stats.split == sum(len(d) > seq_len for d in docs)
    assert len(rebuilt) == len(expected)
    assert sorted(map(tuple, rebuilt)) == sorted(map(tuple, expected))
    want_pairs = sorted((int(a), int(b)) for d in docs for a, b, m in zip(d.tokens, d.tokens[1:], d.trainable[1:]) if m)
    assert sorted(_trained_pairs(batches)) == want_pairs


def test_encode_document_masks_prompt():
    tok = tokenizer_lib.ByteTokenizer()
    doc = packing.encode_document(tok, "12+3=", "15", mask_prompt=True)
    np.testing.assert_array_equal(doc.tokens, [tok.bos_id, *b"12+3=15", tok.eos_id])
    (b,), _ = packing.pack_documents([doc], batch_size=1, seq_len=16, pad_id=tok.pad_id)
    trained = b["targets"][b["loss_mask"] > 0]
    np.testing.assert_array_equal(trained, [*b"15", tok.eos_id])
    doc = packing.encode_document(tok, "12+3=", "15", mask_prompt=False)
    (b,), _ = packing.pack_documents([doc], batch_size=1, seq_len=16, pad_id=tok.pad_id)
    np.testing.assert_array_equal(b["targets"][b["loss_mask"] > 0], [*b"12+3=15", tok.eos_id])


# ------------------------------------------------------------------------------------------ pipeline


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _decoded_docs(batch, tok):
    out = []
    for r in range(batch["tokens"].shape[0]):
        for s in range(1, batch["segment_ids"][r].max() + 1):
            out.append(tok.decode(batch["tokens"][r][batch["segment_ids"][r] == s]))
    return out


def test_builtin_pipeline_deterministic_and_in_order():
    tok = tokenizer_lib.ByteTokenizer()
    kwargs = dict(batch_size=3, seq_len=512, seed=11)
    a = _take(pipeline.make_train_iterator("builtin", tok, **kwargs), 3)
    _assert_batches_equal(a, _take(pipeline.make_train_iterator("builtin", tok, **kwargs), 3))
    other = _take(pipeline.make_train_iterator("builtin", tok, **{**kwargs, "seed": 12}), 1)
    assert not np.array_equal(a[0]["tokens"], other[0]["tokens"])
    b = a[0]
    assert b["tokens"].shape == (3, 512) and b["loss_mask"].dtype == np.float32
    # Targets are the next token within each document.
    same = (b["segment_ids"][:, :-1] == b["segment_ids"][:, 1:]) & (b["segment_ids"][:, :-1] > 0)
    np.testing.assert_array_equal(b["targets"][:, :-1][same], b["tokens"][:, 1:][same])
    # Documents arrive in index order: row 0 starts with problems 0, 1, ... of the train split.
    examples = sources.train_examples(2, seed=11)
    assert _decoded_docs(b, tok)[0] == examples[0].prompt + examples[0].solution
    row0 = b["tokens"][0][b["segment_ids"][0] == 1]
    assert row0[0] == tok.bos_id and row0[-1] == tok.eos_id
    # Only the solution is trained by default.
    trained = b["targets"][0][(b["segment_ids"][0] == 1) & (b["loss_mask"][0] > 0)]
    assert tok.decode(trained) == examples[0].solution and trained[-1] == tok.eos_id


def test_builtin_pipeline_exact_resume_including_mid_document():
    tok = tokenizer_lib.ByteTokenizer()
    # Short rows so passkey/retrieval documents are split across batches.
    kwargs = dict(batch_size=2, seq_len=64, seed=5,
                  task_weights={"passkey": 1.0, "retrieval": 1.0, "addition": 1.0})
    it = pipeline.make_train_iterator("builtin", tok, **kwargs)
    full, states = [], []
    for _ in range(14):
        states.append(json.loads(json.dumps(it.get_state())))  # must survive JSON
        full.extend(_take(it, 1))
    assert any(state["chunk"] > 0 for state in states[:10])  # some saves fall inside a split document
    assert it.stats.split > 0
    for k in range(10):
        fresh = pipeline.make_train_iterator("builtin", tok, **kwargs)
        fresh.set_state(states[k])
        _assert_batches_equal(_take(fresh, 4), full[k:k + 4])
        assert fresh.get_state() == states[k + 4]  # counters included


def test_heldout_split_is_disjoint_from_train():
    kwargs = dict(seed=0, task_weights={"mod_sum": 1.0}, heldout_fraction=0.2)
    train = {e.prompt for e in sources.train_examples(400, **kwargs)}
    heldout = {e.prompt for e in sources.heldout_examples(60, **kwargs)}
    assert heldout and train and not train & heldout
    assert len(train | heldout) <= 100  # the whole mod-10 problem space
    mixed = sources.heldout_examples(40, seed=1)
    assert len({e.task for e in mixed}) >= 5
    assert all(sources.is_heldout(e, 0.1) for e in mixed)
    assert not any(sources.is_heldout(e, 0.1) for e in sources.train_examples(40, seed=1))
    with pytest.raises(ValueError, match="unknown tasks"):
        sources.BuiltinTaskSource(0, weights={"nope": 1.0})


def test_file_sources(tmp_path):
    tok = tokenizer_lib.ByteTokenizer()
    texts = [f"document number {i} ünïcode" + "x" * i for i in range(7)]
    (tmp_path / "docs").mkdir()
    for i, t in enumerate(texts[:4]):
        (tmp_path / "docs" / f"{i}.txt").write_text(t + "\n", encoding="utf-8")
    (tmp_path / "blocks.txt").write_text("\n\n".join(texts[4:]) + "\n", encoding="utf-8")
    pairs = [{"prompt": f"Q{i}: ", "completion": f"A{i}"} for i in range(3)]
    with open(tmp_path / "data.jsonl", "w") as f:
        for t in texts[:2]:
            f.write(json.dumps({"text": t}) + "\n")
        for p in pairs:
            f.write(json.dumps(p) + "\n")

    def one_epoch(source, **kw):
        it = pipeline.make_train_iterator(source, tok, batch_size=2, seq_len=64, seed=3, num_epochs=1, **kw)
        batches = list(it)
        return batches, [d for b in batches for d in _decoded_docs(b, tok)]

    _, docs = one_epoch(str(tmp_path / "docs"))
    assert sorted(docs) == sorted(texts[:4])
    _, docs = one_epoch(str(tmp_path / "blocks.txt"), text_per="block")
    assert sorted(docs) == sorted(texts[4:])
    batches, docs = one_epoch(str(tmp_path / "data.jsonl"))
    assert sorted(docs) == sorted(texts[:2] + [p["prompt"] + p["completion"] for p in pairs])
    trained = [tok.decode(b["targets"][r][(b["segment_ids"][r] == s) & (b["loss_mask"][r] > 0)])
               for b in batches for r in range(2) for s in range(1, b["segment_ids"][r].max() + 1)]
    assert sorted(trained) == sorted(texts[:2] + [p["completion"] for p in pairs])
    # Two shards split one epoch between them.
    shards = [one_epoch(str(tmp_path / "docs"), shard_index=i, shard_count=2)[1] for i in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(texts[:4]) and shards[0] and shards[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        pipeline.make_train_iterator(str(bad), tok, batch_size=1, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        pipeline.make_train_iterator(str(tmp_path / "nope.txt"), tok, batch_size=1, seq_len=8, seed=0)


def test_file_source_shuffled_epochs_resume(tmp_path):
    tok = tokenizer_lib.ByteTokenizer()
    path = tmp_path / "data.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(9):
            f.write(json.dumps({"text": f"doc {i} " + "ab" * int(rng.integers(1, 30))}) + "\n")
    kwargs = dict(batch_size=2, seq_len=32, seed=4, num_epochs=3, mask_prompt=False)
    full = list(pipeline.make_train_iterator(str(path), tok, **kwargs))
    it = pipeline.make_train_iterator(str(path), tok, **kwargs)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    fresh = pipeline.make_train_iterator(str(path), tok, **kwargs)
    fresh.set_state(state)
    _assert_batches_equal(list(fresh), full[5:])
    assert it.stats.documents <= 27
