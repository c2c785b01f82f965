"""The layout of a batch-scoring output on a local disk or object storage, and how it is written and read.

    <output>/part-UUUUUU-SSSSSSSSSS-EEEEEEEEEE-of-TTTTTTTTTT.parquet   scored rows S..E of output unit U (T rows)
    <output>/_quarantine/part-….parquet                                 the rows of that range that could not be scored
    <output>/_unusual/job.json, summary.json                            the job's spec and its summary

:class:`Output` names and writes the files (each appears whole or not at all:
a temporary name renamed on local disks, a single object PUT on S3);
:func:`part_files` and :func:`complete_units` read a listing back;
:func:`~unusual.ray_jobs.local_io.read_footers` reads the parts' counts back.

Imports neither Ray nor PyTorch.
"""

from __future__ import annotations

import json
import os
import re
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from .local_io import filesystem, read_footers

JOB_DIR = "_unusual"
QUARANTINE_DIR = "_quarantine"
SPEC_FILE = "job.json"
SUMMARY_FILE = "summary.json"
PART_RE = re.compile(r"part-(\d{6})-(\d{10})-(\d{10})-of-(\d{10})\.parquet$")
# The counts each part carries in its footer (key ``unusual``); rows = scored + quarantined.
COUNTS = ("rows", "scored", "quarantined", "anomalies")


def part_name(unit: int, start: int, stop: int, total: int) -> str:
    return f"part-{unit:06d}-{start:010d}-{stop:010d}-of-{total:010d}.parquet"


def footer_json(meta: pq.FileMetaData, key: bytes = b"unusual") -> dict:
    """The JSON a writer put under ``key`` in a Parquet file's key-value metadata ({} when absent)."""
    return json.loads((meta.metadata or {}).get(key, b"{}"))


class Output:
    """The output prefix: deterministic part names, atomic writes, listing."""

    def __init__(self, uri: str):

        self.uri = uri.rstrip("/")
        self.pafs, path, self.fs = filesystem(self.uri)
        self.path = path.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def open_atomic(self, *parts: str) -> AtomicFile:
        """A file that appears whole at ``parts`` on commit, or not at all."""
        return AtomicFile(self, self.join(*parts))

    def write_table(self, table: pa.Table, *parts: str) -> None:
        f = self.open_atomic(*parts)
        try:
            pq.write_table(table, f.file)
        except BaseException:
            f.abort()
            raise
        f.commit()

    def write_json(self, obj: dict, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=1, default=float).encode(), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """A small file written whole or not at all."""
        target = self.join(*parts)
        if self.local:
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def read_json(self, *parts: str) -> dict | None:
        target = self.join(*parts)
        if not self.fs.exists(target):
            return None
        return json.loads(self.fs.cat_file(target))

    def listing(self) -> list[str]:
        """Every file under the prefix (relative paths), empty when absent."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.path):
            return []
        return sorted(p[len(self.path) + 1 :] for p in self.fs.find(self.path))

    def remove(self, rel: list[str]) -> None:
        if rel:
            self.fs.rm([self.join(r) for r in rel])

    def remove_all(self) -> None:
        self.fs.rm(self.path, recursive=True)

    def footers(self, rel: list[str]) -> list[pq.FileMetaData]:
        """The footers of files under the prefix (relative paths), read in threads."""
        return read_footers([self.join(r) for r in rel], self.pafs)


class AtomicFile:
    """Written whole or not at all: on local disks a temporary name renamed on
    commit; on object storage one upload that only becomes visible when it
    completes (an aborted or interrupted multipart upload leaves nothing)."""

    def __init__(self, out: Output, target: str):
        self.out, self.target = out, target
        if out.local:
            folder = target.rsplit("/", 1)[0]
            out.fs.makedirs(folder, exist_ok=True)
            self.tmp = f"{folder}/.tmp-{uuid.uuid4().hex}"
            self.file = open(self.tmp, "wb")
        else:
            self.file = out.fs.open(target, "wb")

    def commit(self) -> None:
        self.file.close()
        if self.out.local:
            os.replace(self.tmp, self.target)

    def abort(self) -> None:
        if self.out.local:
            self.file.close()
            os.remove(self.tmp)
        elif hasattr(self.file, "discard"):
            self.file.discard()  # s3fs: abort the multipart upload


def is_temporary(rel: str) -> bool:
    """A temporary file an interrupted local write left behind."""
    return rel.rsplit("/", 1)[-1].startswith(".tmp-")


def part_files(listing: list[str], folder: str = "") -> dict[int, list[tuple[int, int, int, str]]]:
    """unit -> [(start, stop, total, relative path)] of the part files directly in ``folder``."""
    out: dict[int, list] = {}
    for rel in listing:
        if folder:
            if not rel.startswith(folder + "/"):
                continue
            name = rel[len(folder) + 1 :]
        else:
            name = rel
        if "/" in name:
            continue
        m = PART_RE.fullmatch(name)
        if m:
            u, s, e, t = map(int, m.groups())
            out.setdefault(u, []).append((s, e, t, rel))
    return out


def complete_units(parts: dict[int, list]) -> set[int]:
    """Units whose parts tile [0, total) exactly."""
    done = set()
    for u, ps in parts.items():
        ps = sorted(ps)
        total = ps[0][2]
        pos = 0
        for s, e, t, _ in ps:
            if s != pos or t != total or e < s:
                break
            pos = e
        else:
            if pos == total:
                done.add(u)
    return done
