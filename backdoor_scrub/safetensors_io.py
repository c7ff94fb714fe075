"""Validated safetensors reading and deterministic, atomic safetensors writing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch

from backdoor_scrub.errors import input_error

MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar"}
PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

CONVERT_HINT = (
    "convert it with: python -c \"import torch, safetensors.torch as s; "
    "s.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors', "
    "metadata={'arch': 'resnet18', 'num_classes': '10', 'input_size': '3,32,32', "
    "'mean': '0.5,0.5,0.5', 'std': '0.5,0.5,0.5'})\""
)


class SafetensorsFile(NamedTuple):
    """The contents of a safetensors file and the sha256 of its bytes."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str


def read_safetensors(path: Path) -> SafetensorsFile:
    """Read tensors and string metadata after checking the header against the file size."""
    raw = _read_bytes(path)
    header, data_start = _parse_header(path, raw)
    metadata = header.pop("__metadata__", None) or {}
    _check_metadata(path, metadata)
    _check_tensor_entries(path, header, len(raw) - data_start)
    try:
        tensors = safetensors.torch.load(raw)
    except Exception as exc:  # the library's own checks, after ours
        raise input_error(f"{path}: not a valid safetensors file ({exc})") from exc
    return SafetensorsFile(tensors, metadata, hashlib.sha256(raw).hexdigest())


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool
) -> None:
    """Write tensors and metadata to `path` atomically, byte-identical for equal inputs.

    The bytes go to a hidden temporary file in the target folder, fsynced, then hard-linked (never
    clobbers) or renamed to `path`: `path` never holds a partial file. The temporary file is removed
    on any exception; only a process killed outright can leave a hidden `.NAME.*.tmp` behind.
    """
    payload = serialize(tensors, metadata)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temp_name, path)
        else:
            _link_without_clobbering(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of `tensors`, keys and metadata sorted so output is reproducible."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(chunks)


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise input_error(f"{path}: is a folder, expected a .safetensors file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise input_error(f"{path}: cannot read ({exc.strerror})") from exc
    if path.suffix.lower() in PICKLE_SUFFIXES or raw.startswith(PICKLE_MAGICS):
        raise input_error(f"{path}: pickle checkpoints are refused (they can run code); {CONVERT_HINT}")
    return raw


def _parse_header(path: Path, raw: bytes) -> tuple[dict, int]:
    if len(raw) < 8:
        raise input_error(f"{path}: not a safetensors file ({len(raw)} bytes, too short)")
    (header_size,) = struct.unpack("<Q", raw[:8])
    if header_size > min(MAX_HEADER_BYTES, len(raw) - 8):
        raise input_error(f"{path}: not a safetensors file (header size {header_size} exceeds the file)")
    try:
        header = json.loads(raw[8 : 8 + header_size])
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


def _link_without_clobbering(temp_name: str, path: Path) -> None:
    try:
        os.link(temp_name, path)
    except FileExistsError as exc:
        raise input_error(f"{path}: already exists (use --force to overwrite)") from exc
