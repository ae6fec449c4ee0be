"""A synthetic factual world to train small models on and to run Hydra-effect experiments with.

No data can be downloaded, so hydra_jax makes its own: a seeded world of
people and landmarks with random facts (`World`), training text that states
those facts (`World.training_documents`), a tokenizer in which every answer
is one token (`train_tokenizer`), and cloze prompts with held-out templates
for evaluation (`FactDataset`, e.g. "Dorin Valesko was born in the city of"
-> " Veloria").

Public names:

    World                      subjects, answer pools and facts from a seed
    Subject                    one subject and its facts
    FactDataset                prompts / answers / provenance; .to_batch(tokenizer)
    RELATIONS, Relation        relation types and their train / held-out templates
    SPLITS                     ("train", "eval")
    train_tokenizer            BPE + Metaspace tokenizer with <pad>=0, <bos>=1, <eos>=2
    check_single_tokens        raise unless given strings are single tokens
    default_world              World(seed=0)
    default_facts              default_world().facts(split), cached
    default_tokenizer          default_world().train_tokenizer(), cached
    load_counterfact           Counterfact / known-facts JSON -> FactDataset (split "external")
    load_prompts               a .txt, .jsonl or .json prompt file -> FactDataset (answers optional)
    answer_token_ids           first answer token per prompt, flagging multi-token answers
    load_corpus, Corpus        python-docs, a .txt or .jsonl text -> [N, seq_len] token sequences
    python_docs_text           the Python documentation topics as one text (offline English)

Importing this package needs only numpy and tokenizers (beyond hydra_jax itself).
"""

from hydra_jax.data.corpus import Corpus, load_corpus, python_docs_text
from hydra_jax.data.counterfact import answer_token_ids, load_counterfact
from hydra_jax.data.defaults import default_facts, default_tokenizer, default_world
from hydra_jax.data.facts import FactDataset
from hydra_jax.data.prompts import PROMPT_TEXTS, load_prompts
from hydra_jax.data.relations import RELATION_NAMES, RELATIONS, SPLITS, Relation
from hydra_jax.data.tokenizer import check_single_tokens, train_tokenizer
from hydra_jax.data.world import Subject, World

__all__ = [
    "PROMPT_TEXTS",
    "RELATIONS",
    "RELATION_NAMES",
    "SPLITS",
    "Corpus",
    "FactDataset",
    "Relation",
    "Subject",
    "World",
    "answer_token_ids",
    "check_single_tokens",
    "default_facts",
    "default_tokenizer",
    "default_world",
    "load_corpus",
    "load_counterfact",
    "load_prompts",
    "python_docs_text",
    "train_tokenizer",
]
