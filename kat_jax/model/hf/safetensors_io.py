"""Streaming reads and sharded writes of safetensors checkpoints, one tensor at a time.

``SafetensorsReader(hf_dir)`` indexes the tensors of ``model.safetensors``, of the shards named by
``model.safetensors.index.json``, or of every ``*.safetensors`` file, reading headers only. ``read(name)``
reads that one tensor's bytes (plain ``readinto`` at its offset: no mapping of the file) into a fresh
anonymous memory mapping, so host memory holds the tensor being converted and nothing else, and the
memory goes back to the OS the moment the array is dropped. (``safe_open(...).get_tensor`` copies into
the malloc heap; interleaved with the device buffers of the placed params, the freed copies fragmented
the heap and a 317 MB import peaked at 1.27x instead of 1.1x its size.) The format is the documented
one: an 8-byte little-endian header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``,
then the raw little-endian data.

``ShardedWriter(out_dir, max_shard_bytes)`` collects tensors until a shard is full, writes it with
``safetensors.numpy.save_file`` (metadata ``format=pt``, which ``transformers`` requires) and, when
there is more than one shard, writes ``model.safetensors.index.json`` as ``save_pretrained`` does.
"""
from __future__ import annotations

import glob
import json
import math
import mmap
import os
import struct
from typing import Optional

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
    "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def empty_host_array(shape, dtype) -> np.ndarray:
  """An uninitialized array in its own anonymous mapping (unmapped when the array is dropped)."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  buffer = mmap.mmap(-1, max(nbytes, 1))
  return np.frombuffer(buffer, dtype=dtype, count=math.prod(shape)).reshape(shape)


def read_header(path: str) -> tuple[dict, int]:
  """({name: {"dtype", "shape", "data_offsets"}}, byte offset where the data starts)."""
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) != 8:
      raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", prefix)
    if length > 100 << 20:
      raise ValueError(f"{path}: header length {length} is implausible; not a safetensors file")
    raw = f.read(length)
    size = os.fstat(f.fileno()).st_size
  if len(raw) < length:
    raise ValueError(f"{path} is truncated: its header declares {length} bytes of JSON but the "
                     f"file has {size} bytes in all; download or copy it again")
  try:
    header = json.loads(raw)
  except ValueError as error:   # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path}: the safetensors header is not valid JSON ({error}); the file is "
                     "corrupt") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
  header.pop("__metadata__", None)
  data_bytes = max((e["data_offsets"][1] for e in header.values()
                    if isinstance(e, dict) and "data_offsets" in e), default=0)
  if 8 + length + data_bytes > size:
    raise ValueError(f"{path} is truncated: its header describes {data_bytes} bytes of tensor data "
                     f"but the file holds {size - 8 - length}; download or copy it again")
  return header, 8 + length


class SafetensorsReader:
  """Name → (file, header entry) index of a checkpoint directory; tensors are read on demand."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    self.file_of: dict[str, str] = {}
    self._entry: dict[str, tuple[dict, int]] = {}
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted({os.path.join(hf_dir, fname) for fname in weight_map.values()})
      for path in files:
        if not os.path.exists(path):
          raise FileNotFoundError(f"{index_path} names shard {os.path.basename(path)!r}, which is "
                                  f"not in {hf_dir!r}: the download is incomplete")
    else:
      files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
      if not files:
        raise FileNotFoundError(
            f"no safetensors weights in {hf_dir!r} (looked for {SINGLE_FILE}, {INDEX_FILE}, "
            "*.safetensors); convert .bin checkpoints with transformers' save_pretrained("
            "safe_serialization=True) first")
      weight_map = None
    for path in files:
      header, data_start = read_header(path)
      for name, entry in header.items():
        if name in self.file_of:
          raise ValueError(f"tensor {name!r} appears in both {self.file_of[name]} and {path}")
        self.file_of[name] = path
        self._entry[name] = (entry, data_start)
    if weight_map is not None:
      wrong = [n for n, fname in weight_map.items()
               if self.file_of.get(n) != os.path.join(hf_dir, fname)]
      if wrong:
        raise ValueError(f"{index_path} places {wrong[:3]} in files that do not hold them")

  def names(self) -> list[str]:
    return list(self.file_of)

  def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
    """(shape, safetensors dtype string such as 'BF16') from the header, without reading data."""
    entry, _ = self._entry[name]
    return tuple(entry["shape"]), entry["dtype"]

  def read(self, name: str) -> np.ndarray:
    """The tensor as a numpy array (bf16 as ``ml_dtypes.bfloat16``) in its own anonymous mapping."""
    entry, data_start = self._entry[name]
    if entry["dtype"] not in DTYPES:
      raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which kat_jax does not read; "
                       f"known: {sorted(DTYPES)}")
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    out = empty_host_array(shape, DTYPES[entry["dtype"]])
    if end - begin != out.nbytes:
      raise ValueError(f"tensor {name!r} in {self.file_of[name]}: {end - begin} bytes for shape "
                       f"{shape} {entry['dtype']} ({out.nbytes} expected); the file is corrupt")
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(self.file_of[name], "rb", buffering=0) as f:
      f.seek(data_start + begin)
      done = 0
      while done < len(view):
        n = f.readinto(view[done:])
        if not n:
          raise ValueError(f"tensor {name!r}: {self.file_of[name]} ends early (truncated file)")
        done += n
    return out


class ShardedWriter:
  """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes``
  (a tensor larger than that gets a shard of its own), or ``model.safetensors`` when one suffices."""

  def __init__(self, out_dir: str, max_shard_bytes: int = 2 << 30,
               metadata: Optional[dict[str, str]] = None):
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "*.safetensors")) + [
        os.path.join(out_dir, INDEX_FILE)]:
      if os.path.exists(stale):
        os.remove(stale)
    self.out_dir = out_dir
    self.max_shard_bytes = max_shard_bytes
    self.metadata = {"format": "pt", **(metadata or {})}
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[list[str]] = []
    self._total_bytes = 0

  def add(self, name: str, array: np.ndarray) -> None:
    if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending[name] = np.ascontiguousarray(array)
    self._pending_bytes += array.nbytes
    self._total_bytes += array.nbytes

  def _flush(self) -> None:
    if not self._pending:
      return
    from safetensors.numpy import save_file   # extra 'hf'; reading needs no package
    path = os.path.join(self.out_dir, f"shard-{len(self._shards):05d}.tmp.safetensors")
    save_file(self._pending, path, metadata=self.metadata)
    self._shards.append(list(self._pending))
    self._pending, self._pending_bytes = {}, 0

  def close(self) -> list[str]:
    """Finishes the last shard, names the shards as ``save_pretrained`` does; returns file names."""
    self._flush()
    n = len(self._shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                          for i in range(n)]
    for i, fname in enumerate(names):
      os.replace(os.path.join(self.out_dir, f"shard-{i:05d}.tmp.safetensors"),
                 os.path.join(self.out_dir, fname))
    if n > 1:
      weight_map = {t: fname for fname, tensors in zip(names, self._shards) for t in tensors}
      with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}, f,
                  indent=2)
    return names
