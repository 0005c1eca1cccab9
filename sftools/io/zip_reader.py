"""A strict reader for the zip container torch writes (`torch.save`, format >= 1.6).

Why not `zipfile`: torch's loader (miniz via `caffe2/serialize/inline_container.cc`) and Python's
`zipfile` disagree on flag bits, CRCs and local/central name mismatches, and scanners that trusted
`zipfile` were bypassed through those gaps (CVE-2025-1944, -1945, -10156). This reader locates data
exactly as miniz does (central directory offset + 30 + local name and extra lengths) and refuses
every ambiguity instead of picking one reading.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

EOCD_SIG = b"PK\x05\x06"
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
ZIP64_EOCD_SIG = b"PK\x06\x06"
CENTRAL_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"
MAX_ENTRIES = 1_000_000


class ZipError(Exception):
    """The archive is malformed, ambiguous or uses a feature torch checkpoints never use."""


@dataclass(frozen=True)
class ZipEntry:
    name: str
    data_offset: int
    size: int
    problem: str | None = None  # why torch's reader and ours could disagree about this record


def _find_eocd(f, file_size: int) -> int:
    tail_len = min(file_size, 65536 + 22)
    f.seek(file_size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(EOCD_SIG)
    if pos < 0 or len(tail) - pos < 22:
        raise ZipError("no end-of-central-directory record (truncated or not a zip archive)")
    return file_size - tail_len + pos


def _zip64_values(extra: bytes, wanted: list[bool]) -> list[int | None]:
    """Read the ZIP64 extra field: 8-byte values only for the fields that overflowed."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            body = extra[pos + 4 : pos + 4 + size]
            values: list[int | None] = []
            at = 0
            for need in wanted:
                if need:
                    if at + 8 > len(body):
                        raise ZipError("short ZIP64 extra field")
                    values.append(struct.unpack_from("<Q", body, at)[0])
                    at += 8
                else:
                    values.append(None)
            return values
        pos += 4 + size
    if any(wanted):
        raise ZipError("ZIP64 sizes announced but no ZIP64 extra field")
    return [None] * len(wanted)


def read_zip_entries(path: str) -> dict[str, ZipEntry]:
    """Map each record name to where its bytes are; `check_stored` then refuses anything but STORED."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        eocd = _find_eocd(f, file_size)
        f.seek(eocd)
        (_, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len) = struct.unpack(
            "<4sHHHHIIH", f.read(22)
        )
        if disk != 0 or cd_disk != 0 or n_disk != n_total:
            raise ZipError("multi-disk zip archives are not supported")
        if eocd + 22 + comment_len != file_size:
            raise ZipError(f"{file_size - eocd - 22 - comment_len} unexpected bytes after the zip directory")
        if n_total == 0xFFFF or cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
            f.seek(eocd - 20)
            loc = f.read(20)
            if len(loc) != 20 or loc[:4] != ZIP64_LOCATOR_SIG:
                raise ZipError("ZIP64 end-of-directory locator missing")
            (z64_offset,) = struct.unpack_from("<Q", loc, 8)
            f.seek(z64_offset)
            rec = f.read(56)
            if len(rec) != 56 or rec[:4] != ZIP64_EOCD_SIG:
                raise ZipError("ZIP64 end-of-directory record missing")
            n_total, cd_size, cd_offset = struct.unpack_from("<QQQ", rec, 32)
        if n_total > MAX_ENTRIES or cd_offset + cd_size > file_size:
            raise ZipError("zip directory is larger than the file")
        f.seek(cd_offset)
        directory = f.read(cd_size)
        entries: dict[str, ZipEntry] = {}
        seen: set[str] = set()
        pos = 0
        for _ in range(n_total):
            if directory[pos : pos + 4] != CENTRAL_SIG or pos + 46 > len(directory):
                raise ZipError("corrupt central directory entry")
            (flags, method, csize, usize, name_len, extra_len, comment_len, lho) = (
                struct.unpack_from("<H H 8x I I H H H 8x I", directory, pos + 8)
            )
            name_bytes = directory[pos + 46 : pos + 46 + name_len]
            extra = directory[pos + 46 + name_len : pos + 46 + name_len + extra_len]
            pos += 46 + name_len + extra_len + comment_len
            name = name_bytes.decode("utf-8", errors="replace")
            big = _zip64_values(extra, [usize == 0xFFFFFFFF, csize == 0xFFFFFFFF, lho == 0xFFFFFFFF])
            usize = big[0] if big[0] is not None else usize
            csize = big[1] if big[1] is not None else csize
            lho = big[2] if big[2] is not None else lho
            problem = None
            if flags & 0x61:
                problem = f"record {name!r} has encryption or patch flags set (0x{flags:04x})"
            elif method != 0:
                problem = f"record {name!r} is compressed (method {method}); torch writes STORED records"
            elif csize != usize:
                problem = f"record {name!r} has compressed size {csize} != size {usize}"
            # miniz, torch's zip reader, looks names up ignoring case: two names equal but for case
            # could be read differently by torch and by us.
            if name.lower() in seen:
                raise ZipError(f"record {name!r} appears twice in the zip directory (ignoring case)")
            seen.add(name.lower())
            entries[name] = ZipEntry(name, _local_data_offset(f, name_bytes, lho, file_size), usize, problem)
            if entries[name].data_offset + usize > file_size:
                raise ZipError(f"record {name!r} runs past the end of the file (truncated)")
        return entries


def check_stored(entries: dict[str, ZipEntry]) -> None:
    """Refuse the archive if any record is not plain STORED data (compressed, encrypted, patched)."""
    for entry in entries.values():
        if entry.problem:
            raise ZipError(entry.problem)


def _local_data_offset(f, name_bytes: bytes, lho: int, file_size: int) -> int:
    if lho + 30 > file_size:
        raise ZipError("local header offset past the end of the file")
    f.seek(lho)
    header = f.read(30)
    if header[:4] != LOCAL_SIG:
        raise ZipError(f"record {name_bytes.decode(errors='replace')!r} has no local header")
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    local_name = f.read(name_len)
    if local_name != name_bytes:
        raise ZipError(
            f"record name differs between directory ({name_bytes.decode(errors='replace')!r}) "
            f"and local header ({local_name.decode(errors='replace')!r})"
        )
    return lho + 30 + name_len + extra_len
