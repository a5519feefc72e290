"""Rows of a tensor in a ``.safetensors`` file, read with plain file reads into the caller's tensor.

``safetensors.safe_open(...).get_slice`` reads only the rows asked for, but through a memory map of
the whole file: every page it touches counts in the process's resident memory until the file is
closed, and the slice is a new tensor that must then be copied into the shard. For a rank loading
its shard of a target that doubles the transient memory of the load. Here a row range (contiguous
bytes in the file's row-major layout) is read straight into the destination when dtypes match, and
through one temporary of just those rows otherwise (dtype conversion, a device tensor).

The format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data; offsets count from the end of
the header. Everything read from the header is checked against the file before it is used.
"""

from __future__ import annotations

import json
from math import prod
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from deepspec.target.loading import TargetLoadError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """The header of one ``.safetensors`` file, and row reads of its tensors."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise TargetLoadError(
                    f"{self.path}: not a safetensors file (header length {n} in a file of {size} bytes)"
                )
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise TargetLoadError(f"{self.path}: unreadable safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise TargetLoadError(f"{self.path}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self.entries: Dict[str, dict] = header
        self.data_start = 8 + n
        self.data_size = size - self.data_start

    def keys(self) -> List[str]:
        return list(self.entries)

    def info(self, key: str) -> Tuple[torch.dtype, List[int], int]:
        """(dtype, shape, byte offset of the data in the file) of ``key``, checked against the file."""
        e = self.entries.get(key)
        if e is None:
            raise TargetLoadError(f"{self.path}: no tensor {key!r} in it")
        try:
            dtype, shape, (begin, end) = DTYPES[e["dtype"]], [int(d) for d in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise TargetLoadError(
                f"{self.path}: tensor {key!r} has a malformed header entry {e!r} (expected a dtype among "
                f"{sorted(DTYPES)}, a shape and two data_offsets)"
            ) from err
        nbytes = prod(shape) * dtype.itemsize
        if not (0 <= begin and begin + nbytes == end <= self.data_size):
            raise TargetLoadError(
                f"{self.path}: tensor {key!r} ({e['dtype']} {shape}) claims bytes {begin}..{end} of "
                f"{self.data_size}; its shape needs {nbytes}"
            )
        return dtype, shape, self.data_start + begin

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows [start, stop) of ``key`` (dim 0; a 0-d tensor whole) into ``out``, converting dtype."""
        dtype, shape, offset = self.info(key)
        rows_shape = [stop - start, *shape[1:]] if shape else []
        if list(out.shape) != rows_shape:
            raise ValueError(
                f"{self.path}: {key} rows {start}:{stop} have shape {rows_shape}, not {list(out.shape)}"
            )
        row_bytes = prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
        direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        buf = out if direct else torch.empty(rows_shape, dtype=dtype)
        if buf.numel() == 0:
            return
        view = buf.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(offset + start * row_bytes)
            done = 0
            while done < view.size:
                got = f.readinto(view[done:])
                if not got:
                    raise TargetLoadError(f"{self.path}: truncated while reading tensor {key!r}")
                done += got
        if not direct:
            out.copy_(buf)
