"""Prompt files (--data): plain text, JSONL and JSON, CounterFact and known-facts records, the paper's
prompts; a bad file, a tokenizer that cannot read it, or answers it lacks are refused naming the
file and the fix, before any model is loaded."""

from __future__ import annotations

import json
import os
import re

import pytest
import tokenizers
from support.models import REPO

import hydra_jax as hj
import hydra_jax.data as hd
from hydra_jax.cli import main
from hydra_jax.data import default_tokenizer
from hydra_jax.pipeline.inputs import select_prompts as resolve_data

# The paper's 1,209 prompts, beside the project (never copied into it).
KNOWN_1000 = REPO / ".." / "shared" / "data" / "known_1000.json"


CF = {"requested_rewrite": {"prompt": "{} is in", "subject": "Eiffel Tower", "target_true": {"str": "Paris"},
                            "relation_id": "P131"}}  # fmt: skip


KNOWN = {"subject": "Space Needle", "attribute": "Seattle", "template": "{} is in", "prompt": "The Space "
         "Needle is in", "relation_id": "P131"}  # fmt: skip


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def with_rw(**changes) -> dict:
    return {"requested_rewrite": CF["requested_rewrite"] | changes}


# ---- reading prompt files -------------------------------------------------------


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


def test_counterfact_and_known_facts_formats(tmp_path):
    cf = [
        {"requested_rewrite": {"prompt": "{} is located in the city of", "subject": "Eiffel Tower",
                               "target_true": {"str": "Paris"}, "relation_id": "P131"}},
        {"requested_rewrite": {"prompt": "{} was born in", "subject": "Ada Lovelace",
                               "target_true": {"str": "London"}, "relation_id": "P19"}},
    ]  # fmt: skip
    (tmp_path / "cf.json").write_text(json.dumps(cf))
    facts = hj.data.load_counterfact(tmp_path / "cf.json")
    assert facts.prompts == ("Eiffel Tower is located in the city of", "Ada Lovelace was born in")
    assert facts.answers == (" Paris", " London") and facts.relations == ("P131", "P19")
    assert facts.relation_ids == (0, 1) and facts.split == "external"
    known = [{"prompt": "The Space Needle is in", "subject": "Space Needle", "attribute": "Seattle",
              "relation_id": "P131"}]  # fmt: skip
    (tmp_path / "known.json").write_text(json.dumps(known))
    facts = hj.data.load_counterfact(tmp_path / "known.json")
    assert facts.prompts == ("The Space Needle is in",) and facts.answers == (" Seattle",)
    tokenizer = default_tokenizer(2048)
    ids, flagged = hj.data.answer_token_ids(facts, tokenizer)
    assert ids.shape == flagged.shape == (1,)
    assert flagged[0] == (len(tokenizer.encode(" Seattle", add_special_tokens=False)) > 1)
    bad = [
        ([{"requested_rewrite": {"prompt": "no slot", "subject": "x", "target_true": {"str": "y"},
                                 "relation_id": "r"}}], "has no {} subject slot"),
        ([{"prompt": "p", "subject": "s", "attribute": "a"}], "missing 'relation_id'"),
        ([{"something": 1}], "neither 'requested_rewrite'"),
        ({"a": 1}, "non-empty JSON list"),
    ]  # fmt: skip
    for content, message in bad:
        (tmp_path / "bad.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            hj.data.load_counterfact(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hj.data.load_counterfact(tmp_path / "bad.json")


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


def test_utf8_with_byte_order_mark_is_read(tmp_path):
    path = write(tmp_path, "bom.txt", "\ufeffZürich is in\n".encode())
    assert hj.data.load_prompts(path).prompts == ("Zürich is in",)


# Non-ASCII prompts, one outside the BMP (a surrogate pair in UTF-16), in each prompt file format.
UNICODE = [{"prompt": "Zürich is in", "answer": "Switzerland"}, {"prompt": "東京 is the capital of"},
           {"prompt": "The 🙂 emoji is", "answer": "a smile"}]  # fmt: skip
UNICODE_TEXTS = {
    "p.txt": "".join(r["prompt"] + "\n" for r in UNICODE),
    "p.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in UNICODE),
    "p.json": json.dumps(UNICODE, ensure_ascii=False, indent=1),
}


def same_prompts(a: str, b: str) -> bool:
    x, y = hd.load_prompts(a), hd.load_prompts(b)
    return (x.prompts, x.answers) == (y.prompts, y.answers)


@pytest.mark.parametrize("name", list(UNICODE_TEXTS))
@pytest.mark.parametrize(
    "encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
)
def test_a_byte_order_mark_says_the_encoding_and_is_dropped(tmp_path, name, encoding):
    """Windows editors save "Unicode" text as UTF-16 with a byte-order mark. Python's utf-8-sig, utf-16
    and utf-32 codecs write the mark themselves; the -le / -be ones are given it as U+FEFF."""
    text = UNICODE_TEXTS[name]
    plain = tmp_path / "utf8" / name
    plain.parent.mkdir()
    plain.write_text(text, encoding="utf-8")
    path = tmp_path / name
    path.write_text(
        text if encoding in ("utf-8-sig", "utf-16", "utf-32") else "\ufeff" + text, encoding=encoding
    )
    assert path.read_bytes().startswith(tuple(bom for bom, _ in hd.prompts.BOMS))
    assert same_prompts(str(path), str(plain))
    assert hd.load_prompts(str(path)).prompts[0] == "Zürich is in"  # the mark is not part of the first prompt


# ---- bad prompt files -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("two.json", [CF, with_rw(prompt="{} is in {}")], r"Record 1 .*two\.json.*has 2 \{\} subject slots"),
        ("none.json", [with_rw(prompt="Paris is nice")], r"Record 0 .*none\.json.*has no \{\} subject slot"),
        ("braces.json", [KNOWN | {"template": "{0} is in"}], r"Record 0 .*braces\.json.*has no \{\}"),
        ("null.json", [with_rw(target_true={"str": None})], r"Record 0 .*null\.json.*true\.str is null"),
        ("knull.json", [KNOWN, KNOWN | {"attribute": None}], r"Record 1 of .*knull\.json.*attribute is null"),
        ("num.jsonl", '{"prompt": "WWII ended in", "answer": 1945}', r"Line 1 .*num\.jsonl.*be a string"),
        ("nokey.json", [KNOWN | {"subject": None}], r"Record 0 .*nokey\.json.*subject must be a str"),
        ("miss.json", [{"attribute": "x", "subject": "s"}], r"Record 0 .*miss\.json.*missing.*'relation_id'"),
        ("list.jsonl", '{"prompt": "a"}\n[1, 2]\n', r"Line 2 of .*list\.jsonl.*JSON list, not an object"),
        ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", }\n', r"Line 3 of .*bad\.jsonl.* not valid JSON"),
        ("lines.json", '{"prompt": "a"}\n{"prompt": "b"}\n', r"lines\.json.*not valid JSON \(one.* per line"),
        ("empty.json", "", r"empty\.json' is empty"),
        ("empty.jsonl", "\n  \n", r"empty\.jsonl' is empty"),
        ("empty.txt", "\n\n", r"empty\.txt' is empty"),
        ("blank.jsonl", '{"prompt": "  "}', r"Line 1 of .*blank\.jsonl.* has an empty prompt"),
        ("latin1.json", json.dumps([KNOWN | {"subject": "Zürich"}], ensure_ascii=False).encode("latin-1"),
         r"latin1\.json' is not UTF-8 text: byte b'\\xfc' at offset \d+ \(line 1\).*iconv"),
        ("data.csv", "prompt,answer\n", r"Cannot tell the format of .*data\.csv.*\.txt.*\.jsonl.*\.json"),
    ],
)  # fmt: skip
def test_bad_dataset_files(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(ValueError, match=message):
        hj.data.load_prompts(path)


def test_missing_file_and_bad_prompt_text(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No dataset file at .*nothing\.json"):
        hj.data.load_prompts(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match=r"No dataset file at .*nothing\.csv"):
        hj.data.load_prompts(tmp_path / "nothing.csv")
    path = write(tmp_path, "k.json", [KNOWN])
    with pytest.raises(ValueError, match=r"--prompt-text must be 'template' .* got 'both'"):
        hj.data.load_prompts(path, prompt_text="both")


def follow_the_advice(path, message: str) -> str:
    """Run the message's `iconv -f ENC -t UTF-8 NAME > NEW` (with Python's codec of that name) beside
    `path`; returns the new file."""
    enc, name, new = re.search(r"`iconv -f (\S+) -t UTF-8 (\S+) > (\S+)`", message).groups()
    assert name == os.path.basename(path) and new != name  # the original is never written over
    out = os.path.join(os.path.dirname(path), new)
    with open(path, "rb") as f, open(out, "w", encoding="utf-8") as g:
        g.write(f.read().decode(enc))
    return out


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("name", list(UNICODE_TEXTS))
def test_utf16_or_utf32_without_a_byte_order_mark_is_named_as_such(tmp_path, encoding, name):
    """NUL is valid UTF-8, so such a file would decode, as garbage: it is refused, named as what it
    looks like, with a conversion that gives back the text (a single-byte one would garble it)."""
    text = UNICODE_TEXTS[name]
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    plain = write(tmp_path, "utf8" + os.path.splitext(name)[1], text)
    with pytest.raises(ValueError) as err:
        hd.load_prompts(str(path))
    message, label = str(err.value), encoding.upper().replace("-LE", "LE").replace("-BE", "BE")
    first = path.read_bytes().index(0)
    assert message.startswith(
        f"{str(path)!r} is not UTF-8 text: it holds NUL bytes (the first at offset {first}) the way {label} "
        "text saved without a byte-order mark does. Save it again as UTF-8, e.g. `iconv -f "
    ), message
    assert same_prompts(follow_the_advice(str(path), message), plain)


@pytest.mark.parametrize(
    ("encoding", "text", "advice"),
    [
        ("latin-1", "Zürich is in\nCafé au lait is from\n",
         r"byte b'\\xfc' at offset 1 \(line 1\) does not decode\..* e\.g\. "
         r"`iconv -f latin1 -t UTF-8 p\.txt > p\.utf8\.txt` for a Latin-1 file\.$"),
        ("cp1252", "Zürich is in\n“Café” is from\n",
         r"byte b'\\xfc' at offset 1 \(line 1\) does not decode\..* e\.g\. "
         r"`iconv -f cp1252 -t UTF-8 p\.txt > p\.utf8\.txt` for a Windows-1252 file\.$"),
    ],
)  # fmt: skip
def test_a_single_byte_encoding_is_refused_with_a_conversion_that_keeps_the_text(
    tmp_path, encoding, text, advice
):
    # Both fail at the ü; Latin-1 would read Windows-1252's curly quotes (0x93, 0x94) further on as
    # invisible control characters, so the advice reads the whole file.
    path = tmp_path / "p.txt"
    path.write_text(text, encoding=encoding)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"^'.*p\.txt' is not UTF-8 text: {advice}") as err:
        hd.load_prompts(str(path))
    assert same_prompts(follow_the_advice(str(path), str(err.value)), write(tmp_path, "u.txt", text))
    assert path.read_bytes() == before


def test_a_damaged_utf16_file_or_a_binary_one_is_refused_naming_the_offset(tmp_path):
    cut = tmp_path / "cut.txt"
    data = ("\ufeff" + UNICODE_TEXTS["p.txt"]).encode("utf-16-le")[:-1]  # half of the last "\n" is lost
    cut.write_bytes(data)
    with pytest.raises(ValueError) as err:
        hd.load_prompts(str(cut))
    assert str(err.value) == (
        f"{str(cut)!r} starts with a UTF-16LE byte-order mark but is not UTF-16LE text: truncated data at "
        f"byte offset {len(data) - 1} (line 3); the file is damaged or cut short. Save it again, as UTF-8."
    )
    binary = write(tmp_path, "binary.txt", b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(
        ValueError, match=r"binary\.txt' is not text: it holds NUL bytes \(the first at offset 4\)"
    ):
        hd.load_prompts(binary)


def word_tokenizer(tmp_path, words) -> hj.Tokenizer:
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(words)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    return hj.Tokenizer.from_file(path)


def test_a_tokenizer_that_cannot_read_the_data_is_refused(tmp_path):
    config = hj.ModelConfig(d_model=8, n_layers=1, n_heads=1, d_head=8, d_mlp=8, d_vocab=16, n_ctx=16)
    rows = [{"prompt": "Der Eiffelturm steht in der Stadt", "answer": "Paris"}, {"prompt": "Paris is in"}]
    data = write(tmp_path, "facts.jsonl", "\n".join(map(json.dumps, rows)))
    tok = word_tokenizer(tmp_path, ["Paris", "is", "in", "France"])
    # 5 of 9 prompt tokens are unknown (> 50%): refused, naming the tokenizer file and the data.
    message = (r"tokenizer '.*tokenizer\.json' \(vocabulary of 5\) cannot read '.*facts\.jsonl': 5 of its 9 "
               r"prompt tokens .* unknown token '\[UNK\]'.*tokenizer\.json is its own")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        resolve_data(data, tok, config, 10, 0)
    # Most answers unknown: refused too.
    rows = [{"prompt": "Paris is in", "answer": w} for w in ("Frankreich", "Europa", "France")]
    data = write(tmp_path, "answers.jsonl", "\n".join(map(json.dumps, rows)))
    with pytest.raises(ValueError, match=r"cannot read .*answers\.jsonl.* 2 of 3 answers' first tokens"):
        resolve_data(data, tok, config, 10, 0)
    # A few unknown answers: kept for argmax, skipped and counted where the answer is needed.
    rows += [{"prompt": "France is in", "answer": "Paris"}]
    data = write(tmp_path, "some.jsonl", "\n".join(map(json.dumps, rows[1:])))
    batch, info = resolve_data(data, tok, config, 10, 0, target="answer")
    assert batch.size == 2 and info["skipped"]["answer_unknown_token"] == 1
    assert resolve_data(data, tok, config, 10, 0)[0].size == 3


def test_answers_needed_but_absent_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from hydra_jax.loaders.source import ModelSource

    def no_model(source):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(ModelSource, "load", no_model)
    data = write(tmp_path, "prompts.txt", "The Eiffel Tower is in\nThe Space Needle is in\n")
    out = tmp_path / "report"
    for option in (["--filter", "correct"], ["--target", "answer"]):
        argv = ["analyze", "--model", "tiny_chinchilla", "--data", data, *option, "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(rf"{' '.join(option)} needs answers, but the prompts of .*prompts\.txt", err), err
        assert not out.exists()
    bad = write(tmp_path, "bad.json", [with_rw(prompt="{} and {}")])
    assert main(["analyze", "--model", "tiny_chinchilla", "--data", bad, "--out", str(out)]) == 2
    assert "has 2 {} subject slots" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".hydra-report-")]


def test_lines_end_at_line_feeds_only(tmp_path):
    """A prompt holding U+2028 (or U+0085, a form feed) is one prompt, not two; a JSONL line whose
    string holds a raw U+2028 (valid JSON) is one record; CRLF files read as LF files."""
    txt = tmp_path / "p.txt"
    txt.write_text("The line\u2028separator is in\r\nThe next\u0085line\x0c is\n", encoding="utf-8")
    assert hd.load_prompts(str(txt)).prompts == ("The line\u2028separator is in", "The next\u0085line\x0c is")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "A\u2028B is", "answer": " C"}\r\n{"prompt": "D is"}\n', encoding="utf-8")
    facts = hd.load_prompts(str(jsonl))
    assert facts.prompts == ("A\u2028B is", "D is") and facts.answers == (" C", None)


def test_an_answer_whose_first_token_is_a_bare_space_is_skipped_with_its_reason(tmp_path):
    """A SentencePiece-style tokenizer that does not know an answer's first character tokenises
    " Zürich" after the prompt as "▁" + <unk>...: the target would be a bare space. Where an answer
    is needed the prompt is skipped and counted; an answer it can spell is kept."""
    from support.tokenizer_styles import sentencepiece

    tok = sentencepiece(bos=True)
    prompt = "The capital of France is"
    blank = tok.answer_tokens([prompt], [" Zürich"])[0].answer
    assert tok.backend.id_to_token(blank[0]) == "▁" and blank[0] != tok.unk_id  # what the check is for
    config = hj.ModelConfig(d_model=8, n_layers=1, n_heads=1, d_head=8, d_mlp=8, d_vocab=64, n_ctx=16)
    rows = [{"prompt": prompt, "answer": a} for a in ("Zürich", "Paris", "Lyon")]
    data = write(tmp_path, "facts.jsonl", "\n".join(map(json.dumps, rows)))
    prompts, info = resolve_data(data, tok, config, 10, 0, target="answer")
    assert prompts.size == 2 and info["skipped"]["answer_blank_token"] == 1
    assert resolve_data(data, tok, config, 10, 0)[0].size == 3  # argmax needs no answer: all kept
