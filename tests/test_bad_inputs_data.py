"""Bad data and token inputs: each gets an error of the right type that names the input and the fix."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import tokenizers

import hydra_jax as hj
from hydra_jax.batch import check_batch
from hydra_jax.cli import main
from hydra_jax.pipeline.inputs import select_prompts as resolve_data

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


def test_utf8_with_byte_order_mark_is_read(tmp_path):
    path = write(tmp_path, "bom.txt", "\ufeffZürich is in\n".encode())
    assert hj.data.load_prompts(path).prompts == ("Zürich is in",)


@pytest.mark.parametrize(
    ("token_lists", "answers", "error", "message"),
    [
        ([[[1, 2]], [[3]]], None, TypeError, r"token_lists\[0\]\[0\] is a list, not a token id.*not three"),
        ([1, 2, 3], None, TypeError, r"flat list of 3 ints.*wrap a single prompt as \[ids\]"),
        (np.zeros((2, 2, 2), int), None, TypeError, r"token_lists\[0\] must be a 1-D integer array"),
        ("1 2 3", None, TypeError, "token_lists must be a list of token id lists"),
        ([[1, 2.0]], None, TypeError, r"token_lists\[0\]\[1\] = 2\.0 is a float, not an integer token id"),
        ([[1, True]], None, TypeError, r"token_lists\[0\]\[1\] = True is a bool"),
        ([[1, 2**31]], None, ValueError, r"token_lists\[0\] holds token ids \[2147483648\] outside"),
        ([[3], [-1, 2]], None, ValueError, r"token_lists\[1\] holds token ids \[-1\] outside \[0, 2\*\*31\)"),
        ([[1], [2]], ["Paris", "Lyon"], TypeError, r"answers\[0\] = 'Paris' is a str, not an integer"),
        ([[1], [2]], [1.5, 2], TypeError, r"answers\[0\] = 1\.5 is a float"),
        ([[1], [2]], [1, -3], ValueError, r"answers holds token ids \[-3\] outside"),
        ([[1], [2]], 7, TypeError, r"answers must be a list of integer token ids, got int"),
    ],
)  # fmt: skip
def test_bad_token_lists(token_lists, answers, error, message):
    with pytest.raises(error, match=message):
        hj.Batch.from_tokens(token_lists, answers)


def test_bad_ids_in_a_directly_built_batch():
    valid = np.ones((1, 2), bool)
    with pytest.raises(ValueError, match=r"Batch\.tokens holds token ids \[2147483648\] outside"):
        hj.Batch(np.array([[1, 2**31]], np.int64), valid)
    with pytest.raises(ValueError, match=r"Batch\.tokens holds token ids \[-5\] outside"):
        hj.Batch(np.array([[1, -5]]), valid)
    with pytest.raises(ValueError, match=r"Batch\.answers holds token ids \[-1\] outside"):
        hj.Batch(np.array([[1, 2]]), valid, np.array([-1]))


def test_ids_beyond_the_models_vocabulary():
    config = hj.presets.tiny_chinchilla  # d_vocab 97
    message = r"Token ids \[97, 500\] are outside the vocabulary \[0, 97\).*tokenizer"
    with pytest.raises(ValueError, match=message):
        check_batch(config, hj.Batch.from_tokens([[5, 97], [500]]))
    with pytest.raises(ValueError, match=r"Answer token ids must lie in \[0, 97\)"):
        check_batch(config, hj.Batch.from_tokens([[1], [2]], answers=[3, 97]))


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
