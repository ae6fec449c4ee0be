"""Reading a GGUF file: its metadata as plain Python values, its tensors dequantised to float32.

A GGUF file (llama.cpp's format, versions 2 and 3) is a little-endian header
-- magic, version, tensor and key/value counts, the key/value metadata (the
model's shape, its tokenizer), one info record per tensor (name, dims, ggml
type, offset) -- then the tensor data at the next multiple of
``general.alignment``. Every tensor is stored as F32, F16, BF16 or one of
ggml's block-quantised types (Q4_0 ... Q8_0, the K-quants, ...).

The header is parsed here with `struct` and numpy, using the `gguf` package's
constants for the value and tensor types; `gguf.GGUFReader` reads the same
header in about 4 s for a 49k-token vocabulary, because it wraps every string
of the token and merge lists in its own memmap view, while this parser takes
about 0.1 s (tests check the two agree on every key and tensor). The values
are dequantised by `gguf.quants.dequantize` (vectorised numpy, one call per
tensor), from a read-only memmap of the file. Nothing is unpickled.

A damaged file is refused in one line naming it and the part at fault (the
metadata key or tensor record being read): every count in the header (keys,
tensors, string and array lengths, dimensions) is checked against the bytes
left in the file before anything is read or allocated for it, and every
tensor's extent against the file's size. The metadata's types and its counts
against the tensor table are checked where they are read
(`hydra_jax.loaders.gguf.metadata`, `hydra_jax.loaders.gguf.weights`).

Shapes: GGUF lists a tensor's dimensions fastest-varying first (ggml's
``ne[0]`` is the row length), the reverse of numpy's order. `GGUFFile.shape`
and `GGUFFile.tensor` use numpy order, so a matrix of ``ne = [in, out]`` comes
back as ``[out, in]``: the layout of a torch ``Linear`` weight.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
from typing import Any

import gguf
import numpy as np

from hydra_jax.loaders.checkpoint import CheckpointError
from hydra_jax.loaders.gguf.metadata import Metadata

_VT = gguf.GGUFValueType
# struct formats of the fixed-size value types (numpy reads the same codes as dtypes)
_SCALARS = {
    _VT.UINT8: "<B",
    _VT.INT8: "<b",
    _VT.UINT16: "<H",
    _VT.INT16: "<h",
    _VT.UINT32: "<I",
    _VT.INT32: "<i",
    _VT.FLOAT32: "<f",
    _VT.BOOL: "<?",
    _VT.UINT64: "<Q",
    _VT.INT64: "<q",
    _VT.FLOAT64: "<d",
}
_VERSIONS = (2, 3)
_VALUE_TYPES = frozenset(int(t) for t in _VT)
# the tensor types whose block sizes this gguf knows (its enum and size table agree, but check both)
_TENSOR_TYPES = frozenset(int(t) for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES)
_MAX_DIMS = 4  # GGML_MAX_DIMS
# Arrays of arrays: llama.cpp reads none, gguf-py any depth; bounded so damage cannot recurse without end.
_MAX_NESTING = 8


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are, and how they are stored."""

    name: str
    shape: tuple[int, ...]  # numpy order (GGUF's ne reversed)
    kind: gguf.GGMLQuantizationType
    start: int  # byte offset in the file
    nbytes: int


class GGUFFile:
    """One GGUF file: `metadata` (key -> value) and its tensors by name.

    Metadata values are str, int, float, bool, a list of str, or a numpy
    array (numeric arrays such as token scores and types).

    Args:
        path: the ``.gguf`` file.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: an empty file, not a GGUF file, an unsupported
            version, a big-endian file, or a truncated or damaged one (the
            message names the metadata key or tensor at fault).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"No GGUF file at {self.path!r}.")
        if os.path.getsize(self.path) == 0:  # np.memmap cannot map it, and would not say which file
            raise CheckpointError(
                f"{self.path!r} is empty (0 bytes), not a GGUF file; the download or copy did not "
                "finish. Re-download it."
            )
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        header = _Header(self._map, self.path)
        try:
            self.metadata, self._tensors = header.parse()
        except CheckpointError:
            raise
        # The bounds in _Header leave these for damage no check foresaw (or a gguf enum that refuses a
        # value): one line naming the file and where in it, never a traceback.
        except (
            struct.error,
            IndexError,
            KeyError,
            ValueError,
            OverflowError,
            UnicodeDecodeError,
            RecursionError,
        ) as err:
            raise CheckpointError(
                f"{self.path!r} is not a readable GGUF file: {header.where} fails to parse "
                f"({type(err).__name__}: {err}); the file is truncated or damaged. Re-download it."
            ) from err

    @property
    def names(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """The numpy-order shape of tensor `name`."""
        return self._tensors[name].shape

    def type_name(self, name: str) -> str:
        """The storage type of tensor `name` ("F32", "Q4_1", ...)."""
        return self._tensors[name].kind.name

    def raw(self, name: str) -> np.ndarray:
        """Tensor `name`'s stored bytes, uint8 [*shape[:-1], bytes per row] (gguf.quants' input layout)."""
        info = self._tensors[name]
        data = self._map[info.start : info.start + info.nbytes]
        return data.reshape(*info.shape[:-1], -1) if info.shape else data

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` dequantised to float32, in numpy order, checked to be finite."""
        info = self._tensors[name]
        try:
            values = np.asarray(gguf.quants.dequantize(self.raw(name), info.kind), np.float32)
            values = values.reshape(info.shape)
        except NotImplementedError:
            raise CheckpointError(
                f"Tensor {name!r} of {self.path!r} is stored as {info.kind.name}, which the installed gguf "
                f"package cannot dequantise; it dequantises {list(dequantisable())}. Re-quantise the model "
                "to one of those (llama.cpp's llama-quantize) or upgrade gguf."
            ) from None
        except MemoryError:
            raise
        except Exception as err:  # whatever gguf.quants raises on bytes it cannot read
            raise CheckpointError(
                f"Tensor {name!r} of {self.path!r} ({info.kind.name}, shape {list(info.shape)}) cannot be "
                f"dequantised ({type(err).__name__}: {err}); the file is damaged. Re-download it."
            ) from err
        if not values.flags.writeable:  # F32 comes back as a view of the read-only file map: own it
            values = values.copy()
        # One float64 sum is NaN or inf exactly when some value is (and is cheaper than isfinite).
        if not np.isfinite(values.sum(dtype=np.float64)):
            finite = np.isfinite(values)
            raise CheckpointError(
                f"Tensor {name!r} of {self.path!r} has {finite.size - np.count_nonzero(finite)} non-finite "
                "values (NaN or inf); the file is corrupted or was quantised from broken weights. "
                "Re-download or re-convert it."
            )
        return values


class _Header:
    """A cursor over the header bytes, bounding every count by the bytes left before acting on it.

    `where` names the part being read (a metadata key, a tensor record), for the messages.
    """

    def __init__(self, data: np.ndarray, path: str):
        self.data, self.path, self.pos = data, path, 0
        self.buf = memoryview(data)
        self.where = "the header"

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path!r}: {self.where} {what}; the file is truncated or damaged. Re-download it, or "
            "re-convert the model with llama.cpp's convert_hf_to_gguf.py."
        )

    def need(self, n: int, what: str) -> None:
        """Refuse unless `n` bytes are left: before reading them, or allocating anything for them."""
        left = self.data.size - self.pos
        if n > left:
            raise self.fail(f"{what} at offset {self.pos}, but the file ends {left} bytes later")

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, f"needs {size} more bytes")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n, f"holds a string of {n} bytes")
        raw = bytes(self.buf[self.pos : self.pos + n])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(
                f"holds a string that is not UTF-8 (byte {raw[err.start : err.start + 1]!r} at offset "
                f"{self.pos + err.start})"
            ) from None
        self.pos += n
        return text

    def value_type(self) -> gguf.GGUFValueType:
        code = self.unpack("<I")
        if code not in _VALUE_TYPES:
            raise self.fail(f"has value type {code}, which GGUF does not define")
        return _VT(code)

    def value(self, kind: gguf.GGUFValueType, depth: int = 0) -> Any:
        if kind == _VT.STRING:
            return self.string()
        if kind == _VT.ARRAY:
            if depth == _MAX_NESTING:
                raise self.fail(f"nests arrays more than {_MAX_NESTING} deep")
            item = self.value_type()
            count = self.unpack("<Q")
            # the fewest bytes one item can take: a string's length, an array's type and count
            least = 8 if item == _VT.STRING else 12 if item == _VT.ARRAY else struct.calcsize(_SCALARS[item])
            self.need(count * least, f"holds an array of {count} {item.name} values")
            if item in (_VT.STRING, _VT.ARRAY):
                return [self.value(item, depth + 1) for _ in range(count)]
            dtype = np.dtype(_SCALARS[item])
            values = np.frombuffer(self.buf, dtype, count, self.pos)
            self.pos += dtype.itemsize * count
            return values.astype(dtype.newbyteorder("="))  # a native-order copy, detached from the file
        return self.unpack(_SCALARS[kind])

    def parse(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        if self.data.size < 4 or self.unpack("<I") != gguf.GGUF_MAGIC:
            raise CheckpointError(f"{self.path!r} is not a GGUF file (its first bytes are not 'GGUF').")
        version = self.unpack("<I")
        if version not in _VERSIONS:
            if struct.unpack("<I", struct.pack(">I", version))[0] in _VERSIONS:
                raise CheckpointError(
                    f"{self.path!r} is a big-endian GGUF file, which hydra_jax does not read; convert it "
                    "with gguf-py's `gguf-convert-endian FILE little`."
                )
            raise CheckpointError(
                f"{self.path!r} is GGUF version {version}; hydra_jax reads {list(_VERSIONS)}."
            )
        n_tensors, n_kv = self.unpack("<Q"), self.unpack("<Q")
        # A key takes at least 13 bytes (name length, type, a one-byte value), a tensor record 24
        # (name length, dims, type, offset): counts beyond that are damage, refused before any loop.
        self.need(13 * n_kv + 24 * n_tensors, f"declares {n_kv} metadata keys and {n_tensors} tensors")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            self.where = f"metadata key {i + 1} of {n_kv}"
            key = self.string()
            self.where = f"metadata key {key!r}"
            if key in metadata:
                raise self.fail("appears twice")
            metadata[key] = self.value(self.value_type())
        records = []
        for i in range(n_tensors):
            self.where = f"tensor record {i + 1} of {n_tensors}"
            name = self.string()
            self.where = f"the record of tensor {name!r}"
            n_dims = self.unpack("<I")
            if n_dims > _MAX_DIMS:
                raise self.fail(f"has {n_dims} dimensions; ggml tensors have at most {_MAX_DIMS}")
            ne = [self.unpack("<Q") for _ in range(n_dims)]
            if math.prod(ne) >= 2**63 or any(n >= 2**63 for n in ne):
                raise self.fail(f"has dimensions {ne}, more values than ggml can count (2**63)")
            code = self.unpack("<I")
            if code not in _TENSOR_TYPES:
                raise self.fail(
                    f"has tensor type {code}, which the installed gguf package does not know (if the "
                    "file is newer than it, upgrade gguf: pip install -U gguf)"
                )
            records.append((name, ne, gguf.GGMLQuantizationType(code), self.unpack("<Q")))
        self.where = "the header"
        alignment = Metadata(metadata, self.path).integer(
            "general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT, high=None
        )
        if alignment & (alignment - 1):
            raise CheckpointError(f"{self.path!r} has general.alignment={alignment}, not a power of two.")
        start = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, ne, kind, offset in records:
            block, size = gguf.GGML_QUANT_SIZES[kind]
            if ne and ne[0] % block:
                raise CheckpointError(
                    f"Tensor {name!r} of {self.path!r} has rows of {ne[0]} values, not a multiple of "
                    f"{kind.name}'s block of {block}; the file is corrupted."
                )
            nbytes = math.prod(ne) // block * size
            if start + offset + nbytes > self.data.size:
                raise CheckpointError(
                    f"Tensor {name!r} runs past the end of {self.path!r} (its {nbytes} bytes at offset "
                    f"{start + offset}, the file has {self.data.size}); the file is truncated. "
                    "Re-download it."
                )
            if name in tensors:
                raise CheckpointError(f"{self.path!r} holds tensor {name!r} twice; the file is corrupted.")
            tensors[name] = TensorInfo(name, tuple(reversed(ne)), kind, start + offset, nbytes)
        return metadata, tensors


@functools.cache
def dequantisable() -> tuple[str, ...]:
    """The float tensor types the installed gguf package dequantises (probed with one zero block each)."""
    out = []
    for kind in gguf.GGMLQuantizationType:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        if kind.name.startswith("I") and block == 1:  # I8 ... I64: integers, not weights
            continue
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), kind)
        except Exception:  # NotImplementedError, or a type this gguf version does not know
            continue
        out.append(kind.name)
    return tuple(out)
