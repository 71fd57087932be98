"""The embedded default: LIT on SmolLM2-135M-Instruct (target and decoder) on a 2-core CPU.

Reads block 15 of 30, writes the activations after decoder block 0 (LatentQA "replace"),
LoRA r=16. Trains on a mixture, as Activation Oracles does: the LatentQA corpus (personas
and goals; labels held out by seed), six of the sentence-classification datasets read in
the Activation Oracles protocol (the last token of the sentence as a user turn, half the
questions negated; the other datasets are never seen, to measure generalisation) and the
factual relations (subjects held out). The recipe was chosen with the evaluation harness
(README, "Evaluation": the alternatives measured). After training: held-out answer loss
before and after, answers about held-out system prompts, and a short evaluation with
controls (hidden system prompt and classification; `python -m lit_jax.main
--config=configs/evaluate.py --config.decoder=workdirs/smollm2_demo` runs the full one).
remat="matmuls" keeps, per block, only the matmul outputs the backward needs and recomputes
the elementwise rest: less peak memory at about the same step time (README,
benchmarks/train_step.py).
"""

from configs.common import lit_config
from lit_jax.data import LATENTQA_CORPUS

# Trained on; the other yes/no datasets of ../shared/data/classification stay unseen.
CLASSIFICATION_TRAINED = tuple(f"classification/{name}.csv" for name in (
    "gmt_cities", "gmt_sp_en_trans", "engels_5_hist_fig_ismale", "singular_plural_singular_plural",
    "engels_21_headline_istrump", "gmt_larger_than"))


def get_config(arg: str | None = None):
    c = lit_config()
    c.model.remat = "matmuls"
    c.data.read_layers = (15,)
    c.data.sources = (*LATENTQA_CORPUS, *CLASSIFICATION_TRAINED, "relations/factual/*.json")
    c.data.classification_read = "user_turn"
    c.data.relations_label = "relation_subject"
    c.data.max_records_by_source = (("classification/*", 200), ("relations/*", 120))
    c.data.heldout_fraction = 0.2
    c.data.batch_size = 4
    c.train.steps = 120
    c.train.lr = 1e-3
    c.train.warmup_steps = 10
    c.train.eval_every = 0
    c.train.eval_examples = 128
    c.train.checkpoint_every = 40
    c.evaluate.tasks = ("hidden_system", "classification")
    c.evaluate.controls = ("zeros", "text_only")
    c.evaluate.hidden_system_pairs = 1
    c.evaluate.hidden_system_examples = 48
    c.evaluate.per_dataset = 8
    c.evaluate.generate = False
    return c
