"""The prefix cache's second tier: full latent blocks in files on disk, which outlive the process
and outgrow the memory pool.

A block's file is named by its key (`block_keys`): a SHA-256 chained over the model's fingerprint
(`model_fingerprint`: everything that changes a block's bytes) and the token ids of the block and
of every block before it, so a key names one exact token prefix of one model. What is written and
when blocks are read back into the pool is the engine's rule (llm_engine.py); this module owns the
files:

- format: a header (magic, key, the block's token ids, payload length), the payload (the block's
  bytes in the pool's layout: `ModelRunner.export_blocks`), then a CRC-32 of all of it. A file
  whose length, magic, key, token ids or checksum is not what the reader asked for (torn,
  truncated, flipped, another model's) is removed and counted, never served.
- writes: `put` hands a block to a background writer through a bounded queue; a block that finds
  it full is dropped and counted, so the engine thread never waits on the disk. The writer writes
  a temporary file named for this process and renames it into place: a crash leaves a whole file
  or none, and servers sharing a directory never write into one file (same key, same bytes: the
  last rename wins).
- the byte bound: past `max_bytes`, files go least recently used first; a read or a rewrite makes a
  file recent, and its mtime keeps that order across restarts. The index is this process's view
  (the directory's files at start, and its own writes since), so servers sharing a directory each
  keep their own writes and reads within the bound but do not see each other's until a restart.
- reads: `load` reads a run of consecutive blocks on a reader thread, so a long prefix is read
  while the engine steps other requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import shutil
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"MLAPFX1\n"
_HEADER = struct.Struct("<8s32sII")  # magic, key, number of token ids, payload bytes
_CRC = struct.Struct("<I")
SUFFIX = ".blk"
TMP_SUFFIX = ".tmp"
# A temporary file this old at start is a crashed writer's (a live one renames within seconds).
STALE_TMP_S = 600.0
DEFAULT_MAX_BYTES = 32 << 30
WRITE_QUEUE_BLOCKS = 256


def default_directory() -> Path:
    """Where the tier lives when `--disk-cache-dir` is unset: under the project's cache root."""
    from .model.demo_model import cache_root

    return cache_root() / "prefix-cache"


def default_max_bytes(directory: Path) -> int:
    """32 GiB (about 30 contexts of 100K tokens of a 36-layer INT4 model), or a tenth of the free
    space of `directory`'s file system where that is less, so the tier never fills a small disk."""
    probe = directory
    while not probe.exists() and probe != probe.parent:  # not made yet: its file system
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return DEFAULT_MAX_BYTES
    return min(DEFAULT_MAX_BYTES, free // 10)


def model_fingerprint(model_dir: Path, layout: str) -> bytes:
    """What a block's bytes depend on: the model directory's files (weights, config, tokenizer: each
    one's name, size and modification time) and `layout` (the pool's latent format, dtype, block
    size and shapes)."""
    h = hashlib.sha256(layout.encode())
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.digest()


def block_keys(fingerprint: bytes, token_ids: Sequence[int], num_blocks: int, block_size: int) -> list[bytes]:
    """The keys of the first `num_blocks` full blocks of `token_ids`: each a hash of the one before
    it (the fingerprint for the first) and its own token ids."""
    keys, prev = [], fingerprint
    for i in range(num_blocks):
        chunk = np.asarray(token_ids[i * block_size : (i + 1) * block_size], dtype="<i4")
        prev = hashlib.sha256(prev + chunk.tobytes()).digest()
        keys.append(prev)
    return keys


class DiskCache:
    """Block files in `directory`, `max_bytes` at most; each block's payload is `block_nbytes` long.
    `put` and `load` may be called from any one thread; `close` drains the writer."""

    def __init__(self, directory: Path, max_bytes: int, block_nbytes: int, queue_blocks: int = WRITE_QUEUE_BLOCKS):
        self.directory = directory
        self.max_bytes = max_bytes
        self.block_nbytes = block_nbytes
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the index and the counters
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, least recent first
        self._bytes = 0  # the index's sizes, summed
        self.counters = {
            "disk_cache_blocks_written": 0,
            "disk_cache_bytes_written": 0,
            "disk_cache_writes_dropped": 0,
            "disk_cache_blocks_read": 0,
            "disk_cache_files_rejected": 0,
            "disk_cache_evictions": 0,
        }
        self._scan()
        self._queue: queue.Queue[tuple[bytes, tuple[int, ...], np.ndarray] | None] = queue.Queue(queue_blocks)
        self._writer = threading.Thread(target=self._write_loop, name="disk-cache-writer", daemon=True)
        self._writer.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="disk-cache-reader")

    # -- the index ---------------------------------------------------------------------------
    def _path(self, key: bytes) -> Path:
        return self.directory / (key.hex() + SUFFIX)

    def _scan(self) -> None:
        """Index the directory's block files, oldest first; remove crashed writers' temporary files."""
        found = []
        now = time.time()
        for entry in os.scandir(self.directory):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.endswith(TMP_SUFFIX):
                if now - st.st_mtime > STALE_TMP_S:
                    _unlink(Path(entry.path))
            elif entry.name.endswith(SUFFIX) and len(entry.name) == 64 + len(SUFFIX):
                found.append((st.st_mtime_ns, bytes.fromhex(entry.name[:64]), st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self._bytes += size
        self._evict()

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def _touch(self, key: bytes) -> None:
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        with contextlib.suppress(OSError):  # evicted meanwhile by another server
            os.utime(self._path(key))

    def _drop(self, key: bytes) -> None:
        with self._lock:
            self._bytes -= self._index.pop(key, 0)
        _unlink(self._path(key))

    def _evict(self) -> None:
        """Remove least recently used files until the rest fit in `max_bytes`."""
        while True:
            with self._lock:
                if self._bytes <= self.max_bytes or not self._index:
                    return
                key, size = self._index.popitem(last=False)
                self._bytes -= size
                self.counters["disk_cache_evictions"] += 1
            _unlink(self._path(key))

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: bytes, token_ids: tuple[int, ...], payload: np.ndarray) -> None:
        """Queue one block (`payload`: uint8 [block_nbytes]) for writing; never waits. A block on
        disk already is only made recent; one the full queue cannot take is dropped and counted."""
        if self.contains(key):
            self._touch(key)
            return
        try:
            self._queue.put_nowait((key, token_ids, payload))
        except queue.Full:
            with self._lock:
                self.counters["disk_cache_writes_dropped"] += 1

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(*item)
            except OSError as exc:  # a full or read-only disk: this block is lost, not the server
                log.warning("disk cache: could not write a block: %s", exc)
                with self._lock:
                    self.counters["disk_cache_writes_dropped"] += 1
            finally:
                self._queue.task_done()

    def _write(self, key: bytes, token_ids: tuple[int, ...], payload: np.ndarray) -> None:
        body = _HEADER.pack(MAGIC, key, len(token_ids), payload.nbytes)
        body += np.asarray(token_ids, dtype="<i4").tobytes() + payload.tobytes()
        data = body + _CRC.pack(zlib.crc32(body))
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        with self._lock:
            self._bytes += len(data) - self._index.get(key, 0)
            self._index[key] = len(data)
            self._index.move_to_end(key)
            self.counters["disk_cache_blocks_written"] += 1
            self.counters["disk_cache_bytes_written"] += len(data)
        self._evict()

    def flush(self) -> None:
        """Wait until every queued block is written (tests, benchmarks)."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer and the reader."""
        self._queue.put(None)
        self._writer.join()
        self._reader.shutdown(wait=True)

    # -- reads -------------------------------------------------------------------------------
    def load(self, keys: list[bytes], chunks: list[tuple[int, ...]]) -> Future[list[bytes]]:
        """`read`, on the reader thread."""
        return self._reader.submit(self.read, keys, chunks)

    def read(self, keys: list[bytes], chunks: list[tuple[int, ...]]) -> list[bytes]:
        """The payloads of the blocks `keys` (whose token ids are `chunks`), from the first up to
        the first one missing or rejected."""
        out = []
        for key, chunk in zip(keys, chunks, strict=True):
            payload = self._read_one(key, chunk)
            if payload is None:
                break
            out.append(payload)
        return out

    def _read_one(self, key: bytes, chunk: tuple[int, ...]) -> bytes | None:
        if not self.contains(key):
            return None
        try:
            data = self._path(key).read_bytes()
        except OSError:  # evicted by another server sharing the directory, or unreadable
            self._drop(key)
            return None
        payload = self._verify(data, key, chunk)
        if payload is None:
            log.warning("disk cache: removed an invalid block file %s", self._path(key).name)
            with self._lock:
                self.counters["disk_cache_files_rejected"] += 1
            self._drop(key)
            return None
        self._touch(key)
        with self._lock:
            self.counters["disk_cache_blocks_read"] += 1
        return payload

    def _verify(self, data: bytes, key: bytes, chunk: tuple[int, ...]) -> bytes | None:
        """The payload of a file's bytes if they are a whole block file of `key` holding `chunk`."""
        head = _HEADER.size + 4 * len(chunk)
        if len(data) != head + self.block_nbytes + _CRC.size:
            return None
        magic, file_key, n, nbytes = _HEADER.unpack_from(data)
        if (magic, file_key, n, nbytes) != (MAGIC, key, len(chunk), self.block_nbytes):
            return None
        if _CRC.unpack_from(data, len(data) - _CRC.size)[0] != zlib.crc32(memoryview(data)[: -_CRC.size]):
            return None
        if np.frombuffer(data, "<i4", len(chunk), _HEADER.size).tolist() != list(chunk):
            return None
        return data[head : head + self.block_nbytes]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"disk_cache_bytes": self._bytes, **self.counters}


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
