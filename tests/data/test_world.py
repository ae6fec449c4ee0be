"""The synthetic world, its training text and FactDataset: sizes, answer pools, templates,
determinism, what the documents state, and the fact dataset's rows. The trained tokenizer is
in test_tokenizer.py, prompt files in test_prompts.py."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import tokenizers

import hydra_jax as hj
import hydra_jax.data as hd
from hydra_jax.data import documents
from hydra_jax.data.tokenizer import BOS


@pytest.fixture(scope="module")
def first_pass(world) -> list[str]:
    """Exactly one pass over the subjects: every fact must already be stated."""
    return world.training_documents(len(world.subjects))


def sentences(doc: str) -> list[str]:
    assert doc.endswith(".")
    return [s + "." for s in doc[:-1].split(". ")]


def split_sentence(sentence: str) -> tuple[str, str]:
    """(prompt, answer with its leading space) of 'prompt answer.'."""
    prompt, answer = sentence[:-1].rsplit(" ", 1)
    return prompt, " " + answer


# ---- the world ------------------------------------------------------------


def test_world_sizes_and_names(world):
    assert len(world.subjects) >= 1000
    names = [s.name for s in world.subjects]
    assert len(set(names)) == len(names)
    kinds = collections.Counter(s.kind for s in world.subjects)
    assert kinds["person"] >= 0.75 * len(names) and kinds["landmark"] > 0
    for name in names:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name), name
    # Every subject has exactly the relations of its kind, with answers from the relation's pool.
    for s in world.subjects:
        expected = {world.relations[r].name for r in world.relation_ids_for(s.kind)}
        assert set(s.facts) == expected
        for relation, value in s.facts.items():
            assert value in world.answers(relation)
    assert world.subject(names[7]) is world.subjects[7]


def test_answer_pools(world):
    assert len(world.relations) >= 6
    for relation in hd.RELATIONS:
        pool = world.answers(relation.name)
        assert 10 <= len(pool) <= 50, (relation.name, len(pool))
        assert len(set(pool)) == len(pool)
        for value in pool:
            assert re.fullmatch(r"[A-Za-z]{4,}", value), value  # one word
    # Invented names never collide across categories or with subject names.
    invented = [v for k in ("city", "country", "language", "company") for v in world.pools[k]]
    assert len({v.lower() for v in invented}) == len(invented)
    name_words = {w.lower() for s in world.subjects for w in s.name.split()}
    assert not name_words & {v.lower() for pool in world.pools.values() for v in pool}
    strings = world.answer_strings()
    assert all(a.startswith(" ") and " " not in a[1:] for a in strings)
    assert len(strings) == len({v for pool in world.pools.values() for v in pool})


def test_facts_are_random_but_coupled_where_realistic(world):
    people = [s for s in world.subjects if s.kind == "person"]
    for s in people:
        assert s.facts["birth_country"] == world.city_country[s.facts["birth_city"]]
    for s in world.subjects:
        if s.kind == "landmark":
            assert s.facts["landmark_country"] == world.city_country[s.facts["landmark_city"]]
    loyal = np.mean(
        [s.facts["native_language"] == world.country_language[s.facts["birth_country"]] for s in people]
    )
    assert 0.75 < loyal < 0.95
    # Independent facts use (nearly) their whole pool, none dominates.
    for relation in ("birth_city", "employer", "profession", "sport", "instrument"):
        counts = collections.Counter(s.facts[relation] for s in people)
        assert len(counts) >= 0.9 * len(world.answers(relation))
        assert max(counts.values()) < 4 * len(people) / len(world.answers(relation))


def test_templates():
    train_all = {t for r in hd.RELATIONS for t in r.train_templates}
    eval_all = {t for r in hd.RELATIONS for t in r.eval_templates}
    assert not train_all & eval_all
    for r in hd.RELATIONS:
        assert len(r.train_templates) >= 8 and len(set(r.train_templates)) == len(r.train_templates)
        assert len(r.eval_templates) >= 2 and len(set(r.eval_templates)) == len(r.eval_templates)
        for t in r.train_templates + r.eval_templates:
            assert t.count("{subject}") == 1, t
            assert t == t.strip() and (t[0].isupper() or t.startswith("{subject}")), t
            assert not t.endswith((".", ",")), t
    assert hd.RELATIONS[0].templates("train") is hd.RELATIONS[0].train_templates
    with pytest.raises(ValueError, match="train"):
        hd.RELATIONS[0].templates("test")


# ---- determinism ----------------------------------------------------------


def test_same_seed_same_world_documents_and_tokenizer(world):
    again = hd.World(0)
    assert [(s.name, s.facts) for s in again.subjects] == [(s.name, s.facts) for s in world.subjects]
    docs = world.training_documents(3000)
    assert docs == again.training_documents(3000)
    assert docs[:1700] == world.training_documents(1700)  # more documents extend, never reshuffle
    assert docs != world.training_documents(3000, seed=1)  # the document seed matters too
    tok_docs = world.tokenizer_documents(3000)
    assert tok_docs == again.tokenizer_documents(3000)
    json_a = hd.train_tokenizer(tok_docs, 1024).backend.to_str()
    json_b = hd.train_tokenizer(again.tokenizer_documents(3000), 1024).backend.to_str()
    assert json_a == json_b

    other = hd.World(1)
    assert {s.name for s in other.subjects} != {s.name for s in world.subjects}
    assert other.pools["city"] != world.pools["city"]
    assert other.training_documents(3000) != docs
    assert hd.train_tokenizer(other.tokenizer_documents(3000), 1024).backend.to_str() != json_a


# ---- training documents ---------------------------------------------------


def test_documents_state_true_facts_with_training_templates_only(world, first_pass):
    train_prompts = set(world.facts("train").prompts)
    eval_prompts = set(world.facts("eval").prompts)
    docs = first_pass + world.training_documents(2000, seed=3)
    for doc in docs:
        for sentence in sentences(doc):
            prompt, _ = split_sentence(sentence)
            assert prompt in train_prompts, prompt
            assert prompt not in eval_prompts
    # Each sentence's answer is the true one for its (subject, relation).
    facts = world.facts("train")
    truth = dict(zip(facts.prompts, facts.answers, strict=True))
    assert all(truth[split_sentence(s)[0]] == split_sentence(s)[1] for doc in docs for s in sentences(doc))


def test_documents_mix_facts_of_one_subject_in_varied_order(world, first_pass):
    facts = world.facts("train")
    which = {p: (s, r) for p, s, r in zip(facts.prompts, facts.subjects, facts.relation_ids, strict=True)}
    docs = world.training_documents(len(world.subjects) + 3000)
    orders, sizes = collections.Counter(), collections.Counter()
    for doc in docs:
        parsed = [which[split_sentence(s)[0]] for s in sentences(doc)]
        subjects = {s for s, _ in parsed}
        assert len(subjects) == 1  # one subject per document, named in every sentence
        relation_ids = [r for _, r in parsed]
        assert len(set(relation_ids)) == len(relation_ids)  # no fact twice
        sizes[len(relation_ids)] += 1
        if len(relation_ids) >= 3:
            orders[tuple(relation_ids)] += 1
    assert sizes[1] > 300  # single-fact sentences
    assert sum(n for k, n in sizes.items() if k >= 3) > len(docs) / 2  # biographies
    assert len(orders) > 1000  # fact order varies
    person_first = collections.Counter(order[0] for order in orders)
    assert len(person_first) >= 6  # any relation can come first


def test_every_eval_subject_and_fact_is_in_the_first_pass(world, first_pass):
    stated = set()
    for plan in documents.plan(world, len(world.subjects)):
        stated |= {(plan.subject, r) for r, _ in plan.facts}
    names = [s.name for s in world.subjects]
    every = {(i, r) for i, s in enumerate(world.subjects) for r in world.relation_ids_for(s.kind)}
    assert stated == every
    text = "\n".join(first_pass)
    eval_facts = world.facts("eval")
    for name in set(eval_facts.subjects):
        assert re.search(re.escape(name) + r"(?=[ '])", text), name
    assert {documents.render(world, p) for p in documents.plan(world, len(names))} == set(first_pass)


def test_tokenizer_documents_only_replace_the_names(world):
    docs, stand_ins = world.training_documents(500), world.tokenizer_documents(500)
    plans = documents.plan(world, 500)
    replaced = 0
    for doc, alt, plan in zip(docs, stand_ins, plans, strict=True):
        name = world.subjects[plan.subject].name
        # The same text with one stand-in name (two capitalised words) in place of the subject's.
        pattern = re.escape(doc.replace(name, "SUBJECTSLOT")).replace(
            "SUBJECTSLOT", "([A-Z][a-z]+ [A-Z][a-z]+)"
        )
        match = re.fullmatch(pattern, alt)
        assert match is not None, (doc, alt)
        assert len(set(match.groups())) == 1
        replaced += match.group(1) != name
    assert replaced > 490


# ---- FactDataset ----------------------------------------------------------


@pytest.mark.parametrize("split", hd.SPLITS)
def test_fact_dataset_rows(world, split):
    facts = world.facts(split)
    assert facts.split == split and facts.relations == tuple(r.name for r in hd.RELATIONS)
    n_templates = {i: len(r.templates(split)) for i, r in enumerate(hd.RELATIONS)}
    expected = sum(n_templates[r] for s in world.subjects for r in world.relation_ids_for(s.kind))
    assert len(facts) == expected
    other = "eval" if split == "train" else "train"
    other_templates = {t for r in hd.RELATIONS for t in r.templates(other)}
    for p, a, s, r, t, template in zip(
        facts.prompts,
        facts.answers,
        facts.subjects,
        facts.relation_ids,
        facts.template_ids,
        facts.templates(),
        strict=True,
    ):
        relation = hd.RELATIONS[r]
        assert template == relation.templates(split)[t] and template not in other_templates
        assert p == template.replace("{subject}", s) and not p.endswith(" ")
        assert a == " " + world.subject(s).facts[relation.name]


def test_fact_dataset_subset_sample_where(world):
    facts = hd.default_facts()
    assert facts is hd.default_facts("eval") and facts.split == "eval"
    sub = facts.subset([5, 2, 2])
    assert len(sub) == 3 and sub.prompts == (facts.prompts[5], facts.prompts[2], facts.prompts[2])
    assert sub.answers[0] == facts.answers[5] and sub.template_ids[1] == facts.template_ids[2]
    assert sub.relations == facts.relations and sub.split == "eval"
    assert facts.subset(np.array([1, 0])).subjects == (facts.subjects[1], facts.subjects[0])
    assert facts.subset(slice(0, 4)).prompts == facts.prompts[:4]
    mask = np.zeros(len(facts), bool)
    mask[[3, 9]] = True
    assert facts.subset(mask).prompts == (facts.prompts[3], facts.prompts[9])
    with pytest.raises(ValueError, match="boolean mask"):
        facts.subset(mask[:5])
    sample = facts.sample(50, seed=1)
    assert len(sample) == 50 and len(set(sample.prompts)) == 50 and sample == facts.sample(50, seed=1)
    sport = facts.where("sport")
    assert len(sport) > 0 and set(sport.relation_ids) == {facts.relations.index("sport")}


def test_bad_split_and_bad_rows_raise(world):
    with pytest.raises(ValueError, match=r"Unknown split 'test'.*'train', 'eval'"):
        world.facts("test")
    with pytest.raises(ValueError, match=r"Unknown split 'dev'.*'train', 'eval'"):
        hd.default_facts("dev")
    with pytest.raises(ValueError, match="Unknown split"):
        hd.FactDataset(("a",), (" b",), ("s",), (0,), (0,), split="validation")
    with pytest.raises(ValueError, match="equal lengths"):
        hd.FactDataset(("a", "b"), (" b",), ("s",), (0,), (0,), split="eval")
    with pytest.raises(ValueError, match="leading space"):
        hd.FactDataset(("a",), ("b",), ("s",), (0,), (0,), split="eval")
    with pytest.raises(ValueError, match="Unknown relation"):
        world.answers("favourite_colour")


# ---- tokenizer ------------------------------------------------------------


def test_to_batch(world, tokenizer):
    facts = world.facts("eval").sample(64, seed=0)
    batch = facts.to_batch(tokenizer)
    assert isinstance(batch, hj.Batch) and batch.size == 64
    assert [tokenizer.token_to_str(int(a)) for a in batch.answers] == list(facts.answers)
    for i, prompt in enumerate(facts.prompts):
        ids = batch.tokens[i][batch.valid[i]].tolist()
        assert ids == tokenizer.encode(prompt) and ids[0] == BOS
        assert tokenizer.decode(ids) == "<bos> " + prompt
    assert np.all(batch.tokens[~batch.valid] == tokenizer.pad_id)


# ---- prompt files -----------------------------------------------------------


def test_answerless_rows_in_a_fact_dataset(tmp_path):
    facts = hd.FactDataset(("a b", "c"), (" d", None), ("", ""), (0, 0), (0, 0), "external", ("r",))
    assert facts.subset([1]).answers == (None,)
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3, "d": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = hj.Tokenizer(backend)
    with pytest.raises(ValueError, match=r"Rows \[1\] have no answer but others do"):
        facts.to_batch(tok)
    assert facts.subset([1]).to_batch(tok).answers is None
    np.testing.assert_array_equal(facts.subset([0]).to_batch(tok).answers, [4])
    with pytest.raises(ValueError, match=r"Rows \[1\] have no answer"):
        hd.answer_token_ids(facts, tok)


# ---- analyze's prompt selection: --filter correct ---------------------------------
