"""Damaged GGUF files: each is refused in one line naming the file (and the metadata key or tensor at
fault) and the fix, before anything sized by its header is allocated; never a traceback.

Every case starts from a tiny valid file written with `gguf.GGUFWriter` (`support.gguf_files`) and
damages it: a header field patched in place, a metadata value rewritten with another GGUF type
(read back with `gguf.GGUFReader`, written again with `gguf.GGUFWriter`), or the file cut short.
"""

from __future__ import annotations

import re
import struct
import tracemalloc

import gguf
import numpy as np
import pytest
from support.cli import cli, one_error
from support.files import tree
from support.gguf_files import write_model

import hydra_jax as hj
from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.gguf import reader
from hydra_jax.loaders.gguf.reader import GGUFFile

VT = gguf.GGUFValueType


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> str:
    """A valid tiny llama file (2 blocks, D 32, 4 heads of 8, 2 KV heads, F 256, 335 tokens)."""
    return write_model(str(tmp_path_factory.mktemp("gguf") / "good.gguf"))


def rewrite(src: str, dst, changes: dict[str, tuple]) -> str:
    """`src` written again with each metadata key of `changes` set to (value, type[, item type])."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for field in r.fields.values():
        if field.name not in (*changes, "general.architecture") and not field.name.startswith("GGUF."):
            kind = field.types[0]
            w.add_key_value(field.name, field.contents(), kind, field.types[-1] if kind == VT.ARRAY else None)
    for key, change in changes.items():
        w.add_key_value(key, *change)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(dst)


def patched(src: str, dst, at: int, fmt: str, value: int) -> str:
    """`src` with the field at byte `at` overwritten by `value` packed as `fmt`."""
    data = bytearray(open(src, "rb").read())
    data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    dst.write_bytes(bytes(data))
    return str(dst)


def refusal(path: str, load=hj.from_gguf) -> str:
    """The message `load(path)` refuses the file with: one line, naming the file."""
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and repr(path) in message, message
    return message


# ---------------------------------------------------------------- counts against the tensor table


@pytest.mark.parametrize(("count", "kind"), [(2**31, VT.UINT32), (2**32 - 1, VT.UINT32), (2**40, VT.UINT64)])
def test_a_block_count_beyond_the_tensor_table_is_refused_before_anything_is_allocated(
    good, tmp_path, monkeypatch, count, kind
):
    path = rewrite(good, tmp_path / "m.gguf", {"llama.block_count": (count, kind)})
    message = (
        rf"metadata llama\.block_count is {count}, but the tensor table holds 2 blocks \(blk\.0 to blk\.1\)"
    )

    def no_read(*args):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(GGUFFile, "tensor", no_read)
    monkeypatch.setattr(GGUFFile, "raw", no_read)
    for load in (hj.gguf.gguf_config, hj.from_gguf):  # the config alone first: it never loops over blocks
        assert "re-convert" in refusal(path, load)
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError, match=message):
                load(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * 2**20, f"{load.__name__} allocated {peak / 2**20:.0f} MiB before refusing"


@pytest.mark.parametrize(
    ("key", "value", "kind", "message"),
    [
        ("llama.block_count", 3, VT.UINT32, r"block_count is 3, but the tensor table holds 2 blocks"),
        ("llama.block_count", 0, VT.UINT32, r"block_count is 0; it must be at least 1"),
        (
            "llama.attention.head_count",
            2**20,
            VT.UINT32,
            r"head_count is 1048576: 1048576 heads of 0 dims \(embedding_length / head_count\) make 0 rows, "
            r"but blk\.0\.attn_q\.weight has 32",
        ),
        (
            "llama.attention.head_count_kv",
            4,
            VT.UINT32,
            r"head_count_kv is 4: 4 heads of 8 dims .* 32 rows, but blk\.0\.attn_k\.weight has 16",
        ),
        (
            "llama.attention.key_length",
            16,
            VT.UINT32,
            r"head_count is 4: 4 heads of 16 dims \(key_length\) make 64 rows, but blk\.0\.attn_q\.weight "
            r"has 32",
        ),
        (
            "llama.feed_forward_length",
            2**31 - 1,
            VT.UINT32,
            r"feed_forward_length is 2147483647, but blk\.0\.ffn_up\.weight has 256 rows",
        ),
        (
            "llama.feed_forward_length",
            2**31,
            VT.UINT32,
            r"feed_forward_length is 2147483648; it must be in \[1, 2147483647\]",
        ),
        (
            "llama.embedding_length",
            2**31 - 1,
            VT.UINT32,
            r"token_embd\.weight is \[335, 32\] but .* llama\.embedding_length 2147483647",
        ),
        (
            "llama.vocab_size",
            10**9,
            VT.UINT32,
            r"token_embd\.weight is \[335, 32\] but .* vocabulary 1000000000",
        ),
        (
            "llama.context_length",
            2**40,
            VT.UINT64,
            r"context_length is 1099511627776; it must be in \[1, 2147483647\]",
        ),
        ("llama.context_length", -1, VT.INT32, r"context_length is -1; it must be in \[1, 2147483647\]"),
        (
            "llama.attention.head_count_kv",
            [2, 1],
            VT.ARRAY,
            r"sets llama\.attention\.head_count_kv per layer",
        ),
        ("tokenizer.ggml.bos_token_id", 10**6, VT.UINT32, r"bos_token_id=1000000, outside its 335 tokens"),
        ("general.alignment", 3, VT.UINT32, r"general\.alignment=3, not a power of two"),
        ("general.alignment", 0, VT.UINT32, r"general\.alignment is 0; it must be at least 1"),
    ],
)
def test_counts_that_disagree_with_the_tensor_table_are_refused_naming_the_key(
    good, tmp_path, key, value, kind, message
):
    change = (value, kind, VT.UINT32) if kind == VT.ARRAY else (value, kind)
    path = rewrite(good, tmp_path / "m.gguf", {key: change})
    assert re.search(message, refusal(path)), refusal(path)


def test_a_head_count_per_layer_that_repeats_one_value_is_read(good, tmp_path):
    path = rewrite(
        good, tmp_path / "m.gguf", {"llama.attention.head_count_kv": ([2, 2], VT.ARRAY, VT.UINT32)}
    )
    assert hj.gguf.gguf_config(path) == hj.gguf.gguf_config(good)


# ---------------------------------------------------------------- metadata of the wrong type


@pytest.mark.parametrize(
    ("key", "change", "described"),
    [
        ("llama.block_count", ("2", VT.STRING), "is the string '2', not an integer"),
        (
            "llama.block_count",
            ([2, 2], VT.ARRAY, VT.UINT32),
            "is an array of 2 uint32 values, not an integer",
        ),
        ("llama.block_count", (2.0, VT.FLOAT32), "is the float 2.0, not an integer"),
        ("llama.block_count", (True, VT.BOOL), "is the bool True, not an integer"),
        ("llama.embedding_length", (["32"], VT.ARRAY, VT.STRING), "is an array of 1 string, not an integer"),
        ("llama.attention.head_count", (4.0, VT.FLOAT64), "is the float 4.0, not an integer"),
        (
            "llama.attention.head_count_kv",
            ([2.0, 2.0], VT.ARRAY, VT.FLOAT32),
            "is an array of 2 float32 values, not an integer",
        ),
        ("llama.context_length", ("64", VT.STRING), "is the string '64', not an integer"),
        ("llama.attention.layer_norm_rms_epsilon", ("1e-5", VT.STRING), "is the string '1e-5', not a number"),
        ("llama.rope.freq_base", (float("nan"), VT.FLOAT32), "is nan, not a finite number"),
        ("llama.rope.scaling.type", (1, VT.UINT32), "is the integer 1, not a string"),
        ("general.architecture", (["llama"], VT.ARRAY, VT.STRING), "is an array of 1 string, not a string"),
        ("general.alignment", ("32", VT.STRING), "is the string '32', not an integer"),
        ("tokenizer.ggml.model", (7, VT.UINT32), "is the integer 7, not a string"),
        (
            "tokenizer.ggml.tokens",
            ([1, 2, 3], VT.ARRAY, VT.INT32),
            "is an array of 3 int32 values, not an array of strings",
        ),
        (
            "tokenizer.ggml.token_type",
            (["1"], VT.ARRAY, VT.STRING),
            "is an array of 1 string, not an array of integers",
        ),
        ("tokenizer.ggml.scores", (1.5, VT.FLOAT32), "is the float 1.5, not an array of numbers"),
        ("tokenizer.ggml.bos_token_id", ("1", VT.STRING), "is the string '1', not an integer"),
        ("tokenizer.ggml.add_bos_token", ("false", VT.STRING), "is the string 'false', not a bool"),
        ("tokenizer.ggml.add_space_prefix", (1, VT.UINT8), "is the integer 1, not a bool"),
    ],
)
def test_metadata_of_the_wrong_type_is_refused_naming_the_key(good, tmp_path, key, change, described):
    path = rewrite(good, tmp_path / "m.gguf", {key: change})
    message = refusal(path)
    assert f"metadata {key} {described}; the file is damaged" in message, message
    assert message.endswith("re-convert the model with llama.cpp's convert_hf_to_gguf.py."), message


# ---------------------------------------------------------------- empty, foreign and truncated files


def test_an_empty_foreign_or_truncated_file_is_refused_naming_it(good, tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "is empty (0 bytes), not a GGUF file" in refusal(str(empty))
    for i, foreign in enumerate([b"PK\x03\x04 a zip", b'{"__metadata__": {}}', b"GG"]):
        (tmp_path / f"foreign{i}.gguf").write_bytes(foreign)
        assert "is not a GGUF file (its first bytes are not 'GGUF')" in refusal(
            str(tmp_path / f"foreign{i}.gguf")
        )
    data = open(good, "rb").read()
    header = gguf.GGUFReader(good).data_offset  # where the tensor data begins
    cuts = {5, 8, 12, 23, 24, 40, *range(100, header, 613), header - 1, header, header + 1}
    for cut in sorted(cuts | {len(data) // 2, len(data) - 1}):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        message = refusal(str(path))
        assert "truncated" in message and "Re-download it" in message, (cut, message)


def at(key: bytes, skip: int = 0):
    """The offset `skip` bytes after the first occurrence of `key` in the file."""
    return lambda data: data.index(key) + len(key) + skip


TOKENS, SCORES, EMBED = b"tokenizer.ggml.tokens", b"tokenizer.ggml.scores", b"token_embd.weight"


@pytest.mark.parametrize(
    ("where", "fmt", "value", "message"),
    [
        (
            lambda d: 8,
            "<Q",
            2**63,
            r"the header declares 17 metadata keys and 9223372036854775808 tensors at offset 24, but the "
            r"file ends",
        ),
        (lambda d: 16, "<Q", 2**64 - 1, r"the header declares 18446744073709551615 metadata keys"),
        (lambda d: 24, "<Q", 2**63, r"metadata key 1 of 17 holds a string of 9223372036854775808 bytes"),
        (
            lambda d: 32,
            "<B",
            0xFF,
            r"metadata key 1 of 17 holds a string that is not UTF-8 \(byte b'\\xff' at",
        ),
        (at(b"general.architecture"), "<I", 99, r"key 'general.architecture' has value type 99, which GGUF"),
        (
            at(TOKENS, 8),
            "<Q",
            2**64 - 1,
            r"key 'tokenizer.ggml.tokens' holds an array of 18446744073709551615 STR",
        ),
        (
            at(SCORES, 8),
            "<Q",
            2**64 - 1,
            r"key 'tokenizer.ggml.scores' holds an array of 18446744073709551615 FLO",
        ),
        (at(SCORES, 4), "<I", 77, r"metadata key 'tokenizer.ggml.scores' has value type 77"),
        (
            at(EMBED),
            "<I",
            2**31,
            r"tensor 'token_embd.weight' has 2147483648 dimensions; ggml tensors have at mo",
        ),
        (
            at(EMBED, 4),
            "<Q",
            2**63,
            r"'token_embd.weight' has dimensions \[9223372036854775808, 335\], more values",
        ),
        (
            at(EMBED, 20),
            "<I",
            1000,
            r"'token_embd.weight' has tensor type 1000, which the installed gguf package",
        ),
        (
            at(EMBED, 24),
            "<Q",
            2**64 - 1,
            r"Tensor 'token_embd.weight' runs past the end of .* the file is truncated",
        ),
    ],
)
def test_header_fields_beyond_the_file_are_refused_before_they_are_read(
    good, tmp_path, where, fmt, value, message
):
    path = patched(good, tmp_path / "m.gguf", where(open(good, "rb").read()), fmt, value)
    assert re.search(message, refusal(path)), refusal(path)


def header(*keys: bytes) -> bytes:
    """A GGUF v3 header with no tensors and the given raw key/value records."""
    return struct.pack("<IIQQ", gguf.GGUF_MAGIC, 3, 0, len(keys)) + b"".join(keys)


def key(name: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name + body


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            header(
                key(
                    b"deep",
                    struct.pack("<I", VT.ARRAY)
                    + struct.pack("<IQ", VT.ARRAY, 1) * 5000
                    + struct.pack("<IQ", VT.UINT8, 0),
                )
            ),
            r"metadata key 'deep' nests arrays more than 8 deep",
        ),
        (
            header(key(b"a", struct.pack("<IB", VT.UINT8, 1)), key(b"a", struct.pack("<IB", VT.UINT8, 2))),
            r"metadata key 'a' appears twice",
        ),
    ],
)
def test_hand_made_headers_are_refused_naming_the_key(tmp_path, content, message):
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    assert re.search(message, refusal(str(path), GGUFFile)), refusal(str(path), GGUFFile)


# ---------------------------------------------------------------- what gguf or the parser raise


def test_what_gguf_raises_on_a_tensor_is_one_line_naming_the_tensor(good, monkeypatch):
    # gguf.quants gets only extents checked against the file, so no damaged byte is known to make it
    # raise; what it would raise (an IndexError, a struct.error) is wrapped all the same.
    def broken(data, kind):
        raise IndexError("index 7 is out of bounds for axis 1 with size 4")

    monkeypatch.setattr(gguf.quants, "dequantize", broken)
    message = refusal(good)
    assert "cannot be dequantised (IndexError: index 7 is out of bounds" in message
    assert message.startswith("Tensor '") and "(F32, shape [" in message and "Re-download it" in message


def test_an_error_no_check_foresaw_names_where_the_parser_was(good, monkeypatch):
    def broken(self):
        raise struct.error("unpack_from requires a buffer of at least 4 bytes")

    monkeypatch.setattr(reader._Header, "value_type", broken)
    message = refusal(good, GGUFFile)
    assert (
        "is not a readable GGUF file: metadata key 'general.architecture' fails to parse (error: " in message
    )


def test_analyze_of_a_damaged_gguf_file_is_one_line_and_writes_nothing(good, tmp_path, capsys):
    blocks = rewrite(good, tmp_path / "blocks.gguf", {"llama.block_count": (2**31, VT.UINT32)})
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(good, "rb").read()[:5000])
    before = tree(tmp_path)
    for path, what in ((blocks, "llama.block_count is 2147483648"), (str(cut), "the file is truncated")):
        code, err = cli(capsys, "analyze", "--model", path, "--out", tmp_path / "report")
        assert code == 2
        message = one_error(err)
        assert path in message and what in message, message
    assert tree(tmp_path) == before
