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
        CheckpointError: not a GGUF file, an unsupported version, a
            big-endian file, or a truncated one.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"No GGUF file at {self.path!r}.")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self.metadata, self._tensors = _Header(self._map, self.path).parse()
        except CheckpointError:
            raise
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(
                f"{self.path!r} is not a readable GGUF file ({type(err).__name__}: {err}); "
                "check that the download is complete."
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
            values = gguf.quants.dequantize(self.raw(name), info.kind)
        except NotImplementedError:
            raise CheckpointError(
                f"Tensor {name!r} of {self.path!r} is stored as {info.kind.name}, which the installed gguf "
                f"package cannot dequantise; it dequantises {list(dequantisable())}. Re-quantise the model "
                "to one of those (llama.cpp's llama-quantize) or upgrade gguf."
            ) from None
        values = np.asarray(values, np.float32).reshape(info.shape)
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
    """A cursor over the header bytes."""

    def __init__(self, data: np.ndarray, path: str):
        self.data, self.path, self.pos = data, path, 0
        self.buf = memoryview(data)

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        text = bytes(self.buf[self.pos : self.pos + n])
        if len(text) != n:
            raise ValueError("string runs past the end of the file")
        self.pos += n
        return text.decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind == _VT.STRING:
            return self.string()
        if kind == _VT.ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item == _VT.STRING:
                return [self.string() for _ in range(count)]
            if item == _VT.ARRAY:
                return [self.value(_VT.ARRAY) for _ in range(count)]
            dtype = np.dtype(_SCALARS[_VT(item)])
            values = np.frombuffer(self.buf, dtype, count, self.pos)
            self.pos += dtype.itemsize * count
            return values.astype(dtype.newbyteorder("="))  # a native-order copy, detached from the file
        return self.unpack(_SCALARS[_VT(kind)])

    def parse(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        if self.unpack("<I") != gguf.GGUF_MAGIC:
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
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            metadata[key] = self.value(self.unpack("<I"))
        records = []
        for _ in range(n_tensors):
            name = self.string()
            ne = [self.unpack("<Q") for _ in range(self.unpack("<I"))]
            records.append((name, ne, gguf.GGMLQuantizationType(self.unpack("<I")), self.unpack("<Q")))
        alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
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
                    f"Tensor {name!r} runs past the end of {self.path!r}; the file is truncated. "
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
