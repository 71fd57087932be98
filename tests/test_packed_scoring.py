"""Reader.score_examples packed (shared reads and decoder prefixes computed once) vs plain rows:
the same scores, in the input order, without recompiling for a second call of the same shapes."""

import jax
import numpy as np
import pytest

from configs import tiny
from lit_jax.data import tokenize_read
from lit_jax.data.batching import fit_bucket, fixed_rows
from lit_jax.data.packing import pack_batch, target_examples
from lit_jax.lit.config import LitConfig
from lit_jax.lit.job import load_model
from lit_jax.lit.read import Reader, packed_size
from lit_jax.lit.train_state import init_trainable
from lit_jax.models.lora import LoraConfig
from tests.trace_counter import count_traces

SYSTEMS = ("You are a pirate.", "You are a cautious accountant who checks every number twice.",
           "You love cats.", "You are a pirate.")  # the last dialog's user turn differs from the first's
USERS = ("Hi there!", "Can you help me with my taxes?", "Tell me something nice.", "Where is the treasure?")
QA = (("Who is the assistant?", "A pirate."), ("What does the assistant do?", "Checks the accounts carefully."),
      ("What animal?", "Cats."), ("Is it at sea?", "Yes, on a ship with a parrot."))


@pytest.fixture(scope="module")
def reader():
    config = tiny.get_config()
    cfg, base, tok = load_model(config.model, 0)
    lcfg = LitConfig(read_layers=tuple(config.data.read_layers), lora=LoraConfig(rank=4))
    trainable = init_trainable(jax.random.key(0), cfg, lcfg)
    keys = iter(jax.random.split(jax.random.key(1), 64))  # non-zero LoRA B: not the base model
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), trainable)
    return Reader(base, trainable, cfg, lcfg, tok, config.data)


def _reads(tok):
    return [tokenize_read(tok, [{"role": "system", "content": s}, {"role": "user", "content": u}], read_from_turn=1)
            for s, u in zip(SYSTEMS, USERS)]


def _grid_examples(reader):
    """A 4 x 4 choice layout (each read with each question/answer), a 2 x 2 text-only block, and
    single-token reads of one dialog (same read tokens, different read positions): shuffled."""
    reads = _reads(reader.tokenizer)
    pairs = [(i, j) for i in range(4) for j in range(4)]
    ex = reader.examples([reads[i] for i, _ in pairs], [QA[j][0] for _, j in pairs], [QA[j][1] for _, j in pairs])
    ex += reader.examples([reads[i] for i in (0, 0, 1, 1)], [QA[j][0] for j in (0, 1, 0, 1)],
                          [QA[j][1] for j in (0, 1, 0, 1)], text_only=True)
    tokens, positions = reads[2]
    ex += reader.examples([(tokens, positions[-1:]), (tokens, positions[-2:-1]), (tokens, positions[-2:])],
                          [QA[2][0]] * 3, [QA[2][1]] * 3)
    perm = np.random.default_rng(0).permutation(len(ex))
    return [ex[i] for i in perm]


@pytest.mark.parametrize("batch_size,num_rows", [(8, 1), (7, 2), (32, 1)])
def test_packed_scores_equal_plain_in_input_order(reader, batch_size, num_rows):
    ex = _grid_examples(reader)
    plain = reader.score_examples(ex, batch_size=batch_size, pack=False)
    packed = reader.score_examples(ex, batch_size=batch_size, pack=True, num_rows=num_rows)
    np.testing.assert_allclose(packed.logprob, plain.logprob, rtol=1e-5)
    np.testing.assert_array_equal(packed.tokens, plain.tokens)
    np.testing.assert_array_equal(packed.correct, plain.correct)
    assert (plain.tokens == [int(e["loss_mask"].sum()) for e in ex]).all() and (plain.logprob < 0).all()
    # input order: a permuted input gives the permuted scores
    perm = np.random.default_rng(1).permutation(len(ex))
    again = reader.score_examples([ex[i] for i in perm], batch_size=batch_size, num_rows=num_rows)
    np.testing.assert_allclose(again.logprob, packed.logprob[perm], rtol=1e-5)
    np.testing.assert_array_equal(again.tokens, packed.tokens[perm])


def test_a_second_call_of_the_same_shapes_does_not_recompile(reader):
    ex = _grid_examples(reader)
    first = reader.score_examples(ex, batch_size=8)
    with count_traces() as traces:
        second = reader.score_examples(ex, batch_size=8)
    assert traces["target_stats"] == 0, dict(traces)
    np.testing.assert_array_equal(first.logprob, second.logprob)


def test_score_still_equals_plain_scoring(reader):
    reads = _reads(reader.tokenizer)
    questions = [QA[0][0], QA[1][0], QA[0][0]]
    candidates = [[a for _, a in QA], [QA[1][1], QA[0][1]], [QA[2][1]]]
    got = reader.score(reads[:3], questions, candidates)
    owner = [i for i, c in enumerate(candidates) for _ in c]
    ex = reader.examples([reads[i] for i in owner], [questions[i] for i in owner], sum(candidates, []))
    plain = reader.score_examples(ex, pack=False).logprob
    assert [len(g) for g in got] == [4, 2, 1]
    np.testing.assert_allclose(np.concatenate(got), plain, rtol=1e-5)


def test_target_examples_follow_the_packed_targets(reader):
    ex = _grid_examples(reader)[:9]
    rows = fixed_rows(ex, 10, fit_bucket(ex), reader.pad_id, 2)  # a dummy row at the end
    for num_rows in (1, 2, 4):
        packed = pack_batch(rows, num_rows)
        owners = target_examples(rows, num_rows)
        assert len(owners) == num_rows
        for r, own in enumerate(owners):
            mine = list(dict.fromkeys(own.tolist()))  # the row's examples, in order (one index per target)
            want = np.concatenate([ex[i]["decoder_tokens"][ex[i]["loss_mask"]] for i in mine] or [np.zeros(0, int)])
            assert int(packed.targets.mask[r].sum()) == len(own)
            np.testing.assert_array_equal(packed.targets.tokens[r, :len(own)], want)
        assert sorted(set(np.concatenate(owners).tolist())) == list(range(9))


def test_packed_sizes_are_a_coarse_grid():
    assert [packed_size(n, 32) for n in (0, 1, 32, 33, 200, 600, 1000, 1100)] == [32, 32, 32, 64, 224, 640, 1024,
                                                                                  1280]
    assert packed_size(5, 8) == 8 and packed_size(130, 8) == 160
