"""Validated safetensors reading and deterministic, atomic safetensors writing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from backdoor_scrub.errors import input_error
from backdoor_scrub.files import write_atomically

MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar"}
PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

class SafetensorsReader:
    """An open safetensors file with a checked header; each tensor is read on demand, straight into its memory.

    Nothing holds the file whole: loading a 500 MB VGG checkpoint into its model needs no second copy.
    """

    def __init__(self, path: Path, handle: BinaryIO):
        self.path, self._handle = path, handle
        size = os.fstat(handle.fileno()).st_size
        header, self._data_start = _parse_header(path, handle, size)
        metadata = header.pop("__metadata__", None) or {}
        _check_metadata(path, metadata)
        _check_tensor_entries(path, header, size - self._data_start)
        self.metadata: dict[str, str] = metadata
        self._entries: dict[str, dict] = header

    def names(self) -> list[str]:
        """Tensor names, in header order."""
        return list(self._entries)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of one tensor."""
        return DTYPES[self._entries[name]["dtype"]]

    def shape(self, name: str) -> torch.Size:
        """The stored shape of one tensor."""
        return torch.Size(self._entries[name]["shape"])

    def read(self, name: str) -> torch.Tensor:
        """One tensor in fresh memory."""
        tensor = torch.empty(self.shape(name), dtype=self.dtype(name))
        self._read_bytes(name, tensor)
        return tensor

    def read_into(self, name: str, target: torch.Tensor) -> None:
        """Fill `target` (same shape) with one tensor, converted to target's dtype when the file's differs."""
        if target.dtype == self.dtype(name) and target.is_contiguous() and target.device.type == "cpu":
            self._read_bytes(name, target)
        else:
            target.copy_(self.read(name))

    def sha256(self) -> str:
        """The sha256 of the whole file, read in chunks."""
        digest = hashlib.sha256()
        self._handle.seek(0)
        for chunk in iter(lambda: self._handle.read(1 << 20), b""):
            digest.update(chunk)
        return digest.hexdigest()

    def _read_bytes(self, name: str, tensor: torch.Tensor) -> None:
        if not tensor.numel():
            return
        self._handle.seek(self._data_start + self._entries[name]["data_offsets"][0])
        if self._handle.readinto(memoryview(_byte_view(tensor))) != tensor.numel() * tensor.element_size():
            raise input_error(f"{self.path}: the file ended inside a tensor (truncated?)")


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[SafetensorsReader]:
    """The checked file, open for reading; folders and pickles (by suffix or magic bytes) are refused."""
    if path.is_dir():
        raise input_error(f"{path}: is a folder, expected a .safetensors file")
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise input_error(f"{path}: cannot read ({exc.strerror})") from exc
    with handle:
        if path.suffix.lower() in PICKLE_SUFFIXES or handle.read(8).startswith(PICKLE_MAGICS):
            from backdoor_scrub.conversion import pickle_advice  # builds models: only for a pickle

            raise input_error(pickle_advice(path))
        handle.seek(0)
        try:
            yield SafetensorsReader(path, handle)
        except OSError as exc:
            raise input_error(f"{path}: cannot read ({exc.strerror})") from exc


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool
) -> None:
    """Write tensors and metadata to `path` atomically (files.write_atomically), byte-identical for equal inputs."""
    write_atomically(path, lambda handle: serialize(tensors, metadata, handle), overwrite)


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str], stream: BinaryIO) -> None:
    """Write the safetensors bytes of `tensors` to `stream`, keys and metadata sorted so output is reproducible.

    Tensor bytes are written from the tensors' own memory, one after the other, without a copy.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    ordered, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        ordered.append(tensor)
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    stream.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
    for tensor in ordered:
        if tensor.numel():
            stream.write(memoryview(_byte_view(tensor)))


def _byte_view(tensor: torch.Tensor):
    """A contiguous tensor's memory as a uint8 numpy array (no copy; bfloat16 included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _parse_header(path: Path, handle: BinaryIO, size: int) -> tuple[dict, int]:
    if size < 8:
        raise input_error(f"{path}: not a safetensors file ({size} bytes, too short)")
    (header_size,) = struct.unpack("<Q", handle.read(8))
    if header_size > min(MAX_HEADER_BYTES, size - 8):
        raise input_error(f"{path}: not a safetensors file (header size {header_size} exceeds the file)")
    try:
        header = json.loads(handle.read(header_size))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise input_error(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise input_error(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + header_size


def _check_metadata(path: Path, metadata: object) -> None:
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise input_error(f"{path}: safetensors metadata must map strings to strings")


def _check_tensor_entries(path: Path, header: dict, data_size: int) -> None:
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            raise input_error(f"{where} has an unsupported or missing dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not _is_int_list(shape) or not _is_int_list(offsets) or len(offsets) != 2:
            raise input_error(f"{where} has a malformed shape or data_offsets")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[entry["dtype"]].itemsize
        if not 0 <= begin <= end <= data_size or end - begin != expected:
            raise input_error(f"{where} points outside the file or has the wrong byte length (truncated?)")
        spans.append((begin, end))
    spans.sort()
    for (_, previous_end), (begin, _) in zip(spans, spans[1:]):
        if begin < previous_end:
            raise input_error(f"{path}: tensors overlap in the file")


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
