"""The synthetic world, its training text, FactDataset, the trained tokenizer, prompt files and
analyze's prompt selection (--filter correct)."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

import hydra_jax as hj
import hydra_jax.data as hd
from hydra_jax.data import documents
from hydra_jax.data.tokenizer import BOS, EOS, PAD, _single_threaded

N_DOCS = 50_000  # what default_tokenizer trains on
# The paper's 1,209 prompts, beside the project (never copied into it).
KNOWN_1000 = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "known_1000.json"


@pytest.fixture(scope="module")
def world() -> hd.World:
    return hd.default_world()


@pytest.fixture(scope="module")
def tokenizer_docs(world) -> list[str]:
    return world.tokenizer_documents(N_DOCS)


@pytest.fixture(scope="module")
def tokenizer(world, tokenizer_docs) -> hj.Tokenizer:
    return hd.train_tokenizer(tokenizer_docs, 4096, answers=world.answer_strings())


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


def test_default_tokenizer_is_reproducible(tokenizer):
    # default_tokenizer regenerates its corpus and retrains: it must match the fixture exactly.
    assert hd.default_tokenizer().backend.to_str() == tokenizer.backend.to_str()
    assert hd.default_tokenizer() is hd.default_tokenizer()  # cached
    assert hd.default_world() is hd.default_world()


def test_training_is_single_threaded_and_restores_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with _single_threaded():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with _single_threaded():
        pass
    assert "TOKENIZERS_PARALLELISM" not in os.environ


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


def test_tokenizer_specials_and_bos(tokenizer):
    backend = tokenizer.backend
    assert [backend.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [PAD, BOS, EOS] == [0, 1, 2]
    assert tokenizer.pad_id == 0 and tokenizer.vocab_size == 4096
    text = "Karon Tower is located in the city of"
    ids = tokenizer.encode(text)
    assert ids[0] == BOS and ids[1:] == tokenizer.encode(text, add_special_tokens=False)
    assert BOS not in ids[1:] and EOS not in ids
    assert backend.pre_tokenizer is not None and "Metaspace" in backend.to_str()


def test_every_answer_is_one_token(world, tokenizer, tokenizer_docs):
    for answer in world.answer_strings():
        ids = tokenizer.encode(answer, add_special_tokens=False)
        assert len(ids) == 1, (answer, ids)
        assert tokenizer.token_to_str(ids[0]) == answer
        # In running text the answer is that same token (punctuation does not fuse with it).
        assert ids[0] in tokenizer.encode(f"It is{answer}.", add_special_tokens=False)
    # Also at a small vocabulary.
    small = hd.train_tokenizer(tokenizer_docs, 1024, answers=world.answer_strings())
    assert small.vocab_size == 1024
    # Subject names are usually several tokens.
    lengths = [len(tokenizer.encode(" " + s.name, add_special_tokens=False)) for s in world.subjects]
    assert np.median(lengths) >= 3 and min(lengths) >= 2


def test_single_token_check_raises(world):
    docs = world.tokenizer_documents(200)
    with pytest.raises(ValueError, match="not single tokens"):
        hd.train_tokenizer(docs, 150, answers=world.answer_strings())
    with pytest.raises(ValueError, match="too small"):
        hd.train_tokenizer(docs, 20)
    tok = hd.train_tokenizer(docs, 150)  # no answers given: no check
    with pytest.raises(ValueError, match="Train on more documents"):
        hd.check_single_tokens(tok, [" Zzqxv"])


def test_tokenizer_round_trips_through_a_file(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = hj.Tokenizer.from_file(path)
    assert loaded.backend.to_str() == tokenizer.backend.to_str() and loaded.pad_id == 0
    text = "Karon Tower is located in the city of"
    assert loaded.encode(text) == tokenizer.encode(text)


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


def test_text_jsonl_and_plain_json_files(tmp_path):
    (tmp_path / "p.txt").write_text("The Eiffel Tower is in  \n\n   \nAda Lovelace was born in\n")
    facts = hd.load_prompts(tmp_path / "p.txt")
    assert facts.prompts == ("The Eiffel Tower is in", "Ada Lovelace was born in")
    assert facts.answers == (None, None) and facts.split == "external"
    lines = [
        {"prompt": "The Eiffel Tower is in", "answer": "Paris ", "subject": "Eiffel", "relation_id": "P131"},
        {"prompt": "Ada Lovelace was born in", "answer": None},
        {"prompt": "Mount Fuji is in"},
    ]  # fmt: skip
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    facts = hd.load_prompts(tmp_path / "p.jsonl")
    assert facts.answers == (" Paris", None, None)
    assert facts.subjects == ("Eiffel", "", "")
    assert facts.relations == ("P131", "none") and facts.relation_ids == (0, 1, 1)
    (tmp_path / "p.json").write_text(json.dumps(lines))
    assert hd.load_prompts(tmp_path / "p.json") == facts
    # The three JSON record kinds mix in one file.
    cf = {"requested_rewrite": {"prompt": "{} is in", "subject": "Big Ben", "target_true": {"str": "London"},
                                "relation_id": "P131"}}  # fmt: skip
    known = {"subject": "Space Needle", "attribute": "Seattle", "template": "{} is in",
             "prompt": "The Space Needle is in", "relation_id": "P131"}  # fmt: skip
    (tmp_path / "mixed.json").write_text(json.dumps([cf, known, lines[0]]))
    facts = hd.load_prompts(tmp_path / "mixed.json")
    assert facts.prompts == ("Big Ben is in", "Space Needle is in", "The Eiffel Tower is in")
    assert facts.answers == (" London", " Seattle", " Paris")
    long = hd.load_prompts(tmp_path / "mixed.json", prompt_text="prompt")
    assert long.prompts[1] == "The Space Needle is in"
    assert hd.load_counterfact(tmp_path / "mixed.json").prompts == facts.prompts


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


@pytest.mark.skipif(not KNOWN_1000.is_file(), reason="needs ../shared/data/known_1000.json")
def test_known_1000_template_and_prompt_texts():
    template = hd.load_prompts(KNOWN_1000)
    prompt = hd.load_prompts(KNOWN_1000, prompt_text="prompt")
    assert len(template) == len(prompt) == 1209
    assert len(template.relations) == 33 and template.answers == prompt.answers
    differ = [i for i in range(1209) if template.prompts[i] != prompt.prompts[i]]
    assert len(differ) == 478  # the number docs/data.md and --help quote
    assert all(
        p.startswith(t) and len(p) > len(t)
        for t, p in zip(template.prompts, prompt.prompts, strict=True)
        if t != p
    )
    assert template.prompts[19] == "Honus Wagner professionally plays the sport"
    assert prompt.prompts[19] == "Honus Wagner professionally plays the sport of"
    assert template.answers[19] == " baseball"


# ---- analyze's prompt selection: --filter correct ---------------------------------

WORDS = ("a", "b", "c", "d", "e", "f", "g", "h")


def successor(word: str) -> str:
    return WORDS[(WORDS.index(word) + 1) % len(WORDS)]


@pytest.fixture(scope="module")
def planted():
    """A 1-layer model whose clean top token after word w is successor(w), and a word tokenizer.

    The embeddings are scaled up so the residual at the final position is the last
    token's embedding (attention and MLP add little), and the unembedding column of
    successor(w) is w's embedding direction: the planted fact is "w -> successor(w)".
    """
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = hj.Tokenizer(backend)
    d, f, heads, k, v = 32, 64, 2, 16, len(vocab)
    config = hj.ModelConfig(d_model=d, n_layers=1, n_heads=heads, d_head=k, d_mlp=f, d_vocab=v, n_ctx=8)
    rng = np.random.default_rng(0)

    def normal(*shape):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    w_e = 100.0 * normal(v, d)
    w_u = np.zeros((d, v), np.float32)
    for w in WORDS:
        e = w_e[vocab[w]]
        w_u[:, vocab[successor(w)]] = 10.0 * e / np.linalg.norm(e)
    ones = np.ones((1, d), np.float32)
    blocks = {"W_Q": normal(1, d, heads, k), "W_K": normal(1, d, heads, k), "W_V": normal(1, d, heads, k),
              "W_O": normal(1, heads, k, d), "W_in": normal(1, d, f), "W_out": normal(1, f, d),
              "ln1_g": ones, "ln2_g": ones}  # fmt: skip
    params = {"W_E": w_e, "W_U": w_u, "blocks": blocks, "ln_final_g": ones[0]}
    # from_params, not Transformer(config, rngs=...): no random initialisation to compile.
    model = hj.Transformer.from_params(config, jax.tree_util.tree_map(jnp.asarray, params))
    return model, tok


ROWS = [  # prompt, answer; correct iff the answer is the successor of the prompt's last word
    ("a b", "c"),  # correct
    ("c d", "a"),
    ("e", "f"),  # correct
    ("b c", "b"),
    ("d e f", "g"),  # correct
    ("g h", "h"),
    ("h", "a"),  # correct
    ("f", None),  # no answer
]


def by_hand(path, seed: int, n: int) -> tuple[list[str], dict[str, int], int, list[str]]:
    """Walk the seeded order, keeping correct prompts until n are kept: (kept, counts, examined, order)."""
    order = list(hd.load_prompts(path).sample(len(ROWS), seed).prompts)
    answers = dict(ROWS)
    kept, counts, examined = [], {"no_answer": 0, "not_correct": 0}, 0
    for prompt in order:
        if len(kept) == n:
            break
        examined += 1
        if answers[prompt] is None:
            counts["no_answer"] += 1
        elif answers[prompt] == successor(prompt.split()[-1]):
            kept.append(prompt)
        else:
            counts["not_correct"] += 1
    return kept, counts, examined, order


def write_rows(path) -> str:
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": a}) for p, a in ROWS))
    return str(path)


def test_filter_correct_keeps_the_prompts_the_model_completes(planted, tmp_path):
    from hydra_jax.pipeline.inputs import select_prompts as resolve_data

    model, tok = planted
    # The planted fact holds in the clean run (checked once here, on every prompt).
    logits, _ = hj.run(model, hj.Batch.from_prompts(tok, [p for p, _ in ROWS]))
    top = [tok.decode([int(i)]) for i in np.asarray(jnp.argmax(logits[:, -1], -1))]
    assert top == [successor(p.split()[-1]) for p, _ in ROWS]

    path, seed, n = write_rows(tmp_path / "facts.jsonl"), 3, 3
    kept, counts, examined, order = by_hand(path, seed, n)
    assert counts["not_correct"] > 0  # this seed makes the filter drop something
    prompts, info = resolve_data(
        path, tok, model.config, n, seed, filter="correct", model=model, batch_size=2
    )
    batch = prompts.batch  # the analysed (kept) prompts
    assert [tok.decode(batch.tokens[i][batch.valid[i]].tolist()) for i in range(batch.size)] == kept
    np.testing.assert_array_equal(batch.answers, [tok.backend.token_to_id(dict(ROWS)[p]) for p in kept])
    assert info["skipped"] == {
        "longer_than_context": 0,
        "no_answer": counts["no_answer"],
        "answer_not_continuation": 0,
        "answer_unknown_token": 0,
        "not_correct": counts["not_correct"],
    }
    assert info["examined"] == examined and info["prompts"] == n and info["available"] == len(ROWS)
    # Without the filter the same seed keeps the first n prompts, whatever the model says.
    prompts, info = resolve_data(path, tok, model.config, n, seed)
    batch = prompts.batch
    assert [tok.decode(batch.tokens[i][batch.valid[i]].tolist()) for i in range(batch.size)] == order[:n]
    assert info["skipped"] == {"longer_than_context": 0}


def test_filter_correct_end_to_end(planted, tmp_path):
    from hydra_jax.cli import main
    from hydra_jax.report.schema import validate_summary

    model, tok = planted
    ckpt = hj.save(model, tok, tmp_path / "planted")
    path, out = write_rows(tmp_path / "facts.jsonl"), tmp_path / "report"
    argv = ["analyze", "--model", str(ckpt), "--data", path, "--filter", "correct", "--n-prompts", "4",
            "--kind", "zero", "--batch-size", "4", "--n-bootstrap", "20", "--out", str(out)]  # fmt: skip
    assert main([*argv, "--quiet"]) == 0
    doc = json.loads((out / "summary.json").read_text())
    validate_summary(doc)
    kept, counts, examined, _ = by_hand(path, 0, 4)
    with np.load(out / "effects.npz") as npz:  # the clean top tokens: the kept prompts' answers
        np.testing.assert_array_equal(npz["target"], [tok.backend.token_to_id(dict(ROWS)[p]) for p in kept])
    assert doc["data"]["prompts"] == 4 and doc["data"]["examined"] == examined
    assert doc["settings"]["filter"] == "correct" and doc["settings"]["prompt_text"] == "template"
    assert {k: doc["skipped"][k] for k in counts} == counts
