"""experiments/paper/long_context.py: task generators against hand checks, packing, scoring, one training step."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "paper" / "long_context.py"


@pytest.fixture(scope="module")
def lc():
    spec = importlib.util.spec_from_file_location("long_context", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mqar_doc_by_hand(lc):
    rng = np.random.default_rng(123)
    length, pairs = 48, 6
    tokens, mask = lc.mqar_doc(rng, length, pairs)
    assert tokens.shape == mask.shape == (length,)
    keys, vals = tokens[0:12:2], tokens[1:12:2]
    assert len(set(keys.tolist())) == pairs
    assert all(lc.KEYS[0] <= k < lc.KEYS[1] for k in keys)
    assert all(lc.VALUES[0] <= v < lc.VALUES[1] for v in vals)
    table = dict(zip(keys.tolist(), vals.tolist()))
    # The query block: the last 2P tokens are key, value pairs; every key asked once, each with its own value.
    q_keys, q_vals = tokens[length - 12::2], tokens[length - 11::2]
    assert sorted(q_keys.tolist()) == sorted(keys.tolist())
    for k, v in zip(q_keys.tolist(), q_vals.tolist()):
        assert table[k] == v
    # Filler in between, and the mask marks exactly the query keys (whose next token is the answer).
    assert all(lc.FILLER[0] <= t < lc.FILLER[1] for t in tokens[12:length - 12])
    expected_mask = np.zeros(length)
    expected_mask[length - 12::2] = 1
    np.testing.assert_array_equal(mask, expected_mask)


def test_passkey_doc_by_hand(lc):
    for seed in range(20):
        tokens, mask = lc.passkey_doc(np.random.default_rng(seed), 32)
        n = lc.PASSKEY_LEN
        (marks,) = np.nonzero(tokens == lc.MARK)
        (queries,) = np.nonzero(tokens == lc.QUERY)
        assert len(marks) == 1 and queries.tolist() == [32 - n - 1]
        at = marks[0]
        assert at + n < queries[0]  # the passkey is complete before the question
        np.testing.assert_array_equal(tokens[at + 1:at + 1 + n], tokens[-n:])
        expected_mask = np.zeros(32)
        expected_mask[32 - n - 1:31] = 1
        np.testing.assert_array_equal(mask, expected_mask)


def test_generators_reject_bad_settings(lc):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="pair_ratio"):
        lc.mqar_doc(rng, 16, 8)
    with pytest.raises(ValueError, match="divide"):
        lc.packed_rows(rng, ["mqar"], [48], 64, 8)


def test_packed_rows_and_score(lc):
    rng = np.random.default_rng(7)
    rows = lc.packed_rows(rng, ["mqar", "passkey"], [32, 64], 64, 8)
    assert rows["tokens"].shape == (2, 64)
    np.testing.assert_array_equal(rows["segment_ids"][0], np.repeat([1, 2], 32))
    np.testing.assert_array_equal(rows["positions"][0], np.tile(np.arange(32), 2))
    np.testing.assert_array_equal(rows["segment_ids"][1], np.ones(64))
    # The answer never sits on a document's first token (it is predicted from inside the document).
    starts = rows["positions"] == 0
    assert not np.any(starts[:, 1:] & (np.roll(rows["mask"], 1, axis=1)[:, 1:] > 0))

    # mqar scoring by hand: a perfect predictor scores 1; break one answer -> (n - 1) / n.
    mq = lc.packed_rows(rng, ["mqar"] * 2, [32, 32], 64, 8)
    perfect = np.concatenate([mq["tokens"][:, 1:], np.zeros((2, 1), np.int32)], axis=1)
    n = mq["mask"].sum()
    assert lc.score(perfect, mq) == (n, n)
    broken = perfect.copy()
    r, t = np.argwhere(mq["mask"] > 0)[0]
    broken[r, t] = (broken[r, t] + 1) % lc.VOCAB
    assert lc.score(broken, mq) == (n - 1, n)

    # passkey scoring: one wrong token spoils only its own document.
    pk = lc.packed_rows(rng, ["passkey"] * 2, [16, 16], 64, 8)  # 4 documents per row
    perfect = np.concatenate([pk["tokens"][:, 1:], np.zeros((2, 1), np.int32)], axis=1)
    assert lc.score(perfect, pk) == (8.0, 8.0)
    broken = perfect.copy()
    r, t = np.argwhere(pk["mask"] > 0)[1]
    broken[r, t] = (broken[r, t] + 1) % lc.VOCAB
    assert lc.score(broken, pk) == (7.0, 8.0)


def test_equal_parameter_counts(lc):
    counts = [lc.count_params(lc.variant_config(k, 4, 64))["total"] for k in ("softmax", "lightning", "hybrid")]
    assert max(counts) / min(counts) - 1 < 0.005, counts
    assert lc.variant_config("hybrid", 8, 64).layer_types.count("softmax") == 1


def test_one_training_step_lowers_loss_on_its_batch(lc):
    cfg = lc.variant_config("hybrid", 2, 32, hidden=32, heads=2, head_dim=16, ffn=64)
    opt, train_step = lc.make_train_step(cfg, steps=10, lr=3e-3)
    params = lc.init_params(cfg, jax.random.key(0))
    opt_state = opt.init(params)
    rows = lc._feed(lc.packed_rows(np.random.default_rng(3), [None] * 2, [16, 32], 32, 4))
    losses = []
    for _ in range(4):
        params, opt_state, loss, pred = train_step(params, opt_state, rows)
        losses.append(float(loss))
    assert pred.shape == rows["tokens"].shape
    assert np.isfinite(losses).all()
    # Near log(vocab) at init (answer tokens only), and the same batch again gives a lower loss.
    assert abs(losses[0] - np.log(lc.VOCAB)) < 0.5
    assert losses[-1] < losses[0]
