"""image/datalab_archive.py, the pure part of the instance's archive API: hostile archives refused
before anything is written (and what was written removed when writing fails), folders unpacked with
their tree, and the working directory packed as a stream of plain files and folders."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import datalab_archive
from datalab_archive import Limits
from datalab_archive import Occupied
from datalab_archive import Refused
from datalab_archive import TooLarge
from datalab_archive import pack
from datalab_archive import unpack
from helpers import zip_info
from helpers import zip_of

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **fields):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = kind, mode, len(data) if kind == tarfile.REGTYPE else 0
    for field, value in fields.items():
        setattr(info, field, value)
    return info, data


def tar_of(*members, gz: bool = False, form: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    mode = "w:gz" if gz else "w"
    with tarfile.open(fileobj=out, mode=mode, format=form, encoding="utf-8", errors="surrogateescape") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def run(data: bytes, fmt: str, root: Path, entries: int = 1000, size: int = 1 << 20):
    return unpack(io.BytesIO(data), fmt, str(root), Limits(entries, size))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def truncated_tar_gz() -> bytes:
    whole = tar_of(member("a.bin", os.urandom(300_000)), member("b.bin", os.urandom(300_000)), gz=True)
    return whole[: len(whole) // 2]


def bad_second_header() -> bytes:
    """A tar whose second header is damaged (tarfile alone would end its listing there, quietly)."""
    data = bytearray(tar_of(member("a.csv", b"1,2\n"), member("b.csv", b"3,4\n"), form=tarfile.GNU_FORMAT))
    data[1024] ^= 0x20  # the second header's name: its checksum no longer matches
    return bytes(data)


def declares_2_gib() -> bytes:
    """A tar.gz whose one header declares 2 GiB (and holds none of it)."""
    info, _ = member("huge.bin")
    info.size = 2 * GIB
    return gzip.compress(info.tobuf(tarfile.PAX_FORMAT))


HOSTILE: dict[str, tuple[str, Callable[[], bytes], type[Refused], str]] = {
    "zip_parent": ("zip", lambda: zip_of(("../evil.sh", b"x")), Refused, "'..'"),
    "zip_parent_deep": ("zip", lambda: zip_of(("a/b/../../../evil", b"x")), Refused, "'..'"),
    "tar_parent": ("tar", lambda: tar_of(member("../evil", b"x")), Refused, "'..'"),
    "zip_absolute": ("zip", lambda: zip_of(("/etc/cron.d/evil", b"x")), Refused, "absolute"),
    "tar_absolute": ("tar", lambda: tar_of(member("/etc/passwd", b"x")), Refused, "absolute"),
    "tar_gz_absolute_dir": (
        "tar.gz",
        lambda: tar_of(member("/root/", kind=tarfile.DIRTYPE), gz=True),
        Refused,
        "absolute",
    ),
    "tar_symlink_to_passwd": (
        "tar",
        lambda: tar_of(member("passwd", kind=tarfile.SYMTYPE, linkname="/etc/passwd")),
        Refused,
        "symbolic link",
    ),
    "tar_symlink_then_write_through": (
        "tar",
        lambda: tar_of(member("d", kind=tarfile.SYMTYPE, linkname="/tmp"), member("d/x", b"x")),
        Refused,
        "symbolic link",
    ),
    "zip_symlink": ("zip", lambda: zip_of((zip_info("passwd", stat.S_IFLNK | 0o777), b"/etc/passwd")), Refused, "link"),
    "tar_hard_link": (
        "tar",
        lambda: tar_of(member("a.csv", b"1"), member("b.csv", kind=tarfile.LNKTYPE, linkname="/etc/shadow")),
        Refused,
        "hard link",
    ),
    "tar_fifo": ("tar", lambda: tar_of(member("pipe", kind=tarfile.FIFOTYPE)), Refused, "FIFO"),
    "tar_device": (
        "tar.gz",
        lambda: tar_of(member("null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3), gz=True),
        Refused,
        "character device",
    ),
    "zip_socket": ("zip", lambda: zip_of((zip_info("sock", stat.S_IFSOCK | 0o755), b"")), Refused, "socket"),
    "zip_duplicate": ("zip", lambda: zip_of(("a.csv", b"1"), ("a.csv", b"2")), Refused, "twice"),
    "tar_duplicate_dir": (
        "tar",
        lambda: tar_of(member("d", kind=tarfile.DIRTYPE), member("d/", kind=tarfile.DIRTYPE)),
        Refused,
        "twice",
    ),
    "file_and_folder": ("zip", lambda: zip_of(("a", b"file"), ("a/b.csv", b"1")), Refused, "is a file, and"),
    "file_and_folder_entry": ("zip", lambda: zip_of(("a", b"file"), ("a/", b"")), Refused, "twice"),
    "control_character": ("zip", lambda: zip_of(("a\nforged.csv", b"x")), Refused, "control"),
    "bidi_override": ("tar", lambda: tar_of(member("report\u202evsc.exe", b"x")), Refused, "'report\\u202evsc.exe'"),
    "backslash": ("zip", lambda: zip_of(("..\\evil", b"x")), Refused, "'..'"),
    "backslash_only": ("zip", lambda: zip_of(("a\\b", b"x")), Refused, "single name"),
    "long_part": ("tar", lambda: tar_of(member("d/" + "x" * 256, b"x")), Refused, "255 bytes"),
    "empty_part": ("tar", lambda: tar_of(member("a//b", b"x")), Refused, "empty"),
    "dot_part": ("tar", lambda: tar_of(member("a/./b", b"x")), Refused, "'.'"),
    "not_utf8": ("tar", lambda: tar_of(member("\udcff.csv", b"x"), form=tarfile.GNU_FORMAT), Refused, "UTF-8"),
    "encrypted_zip": ("zip", lambda: encrypted_zip(), Refused, "encrypted"),
    "too_many_entries": ("zip", lambda: zip_of(*((f"f{i}", b"") for i in range(1001))), TooLarge, "1000 entries"),
    "too_many_bytes": (
        "tar",
        lambda: tar_of(member("a", bytes(600_000)), member("b", bytes(600_000))),
        TooLarge,
        "bytes",
    ),
    "declares_2_gib": ("tar.gz", declares_2_gib, TooLarge, "bytes"),
    "random_bytes_zip": ("zip", lambda: os.urandom(4096), Refused, "not a readable zip"),
    "random_bytes_tar": ("tar", lambda: os.urandom(4096), Refused, "not a readable tar"),
    "random_bytes_tar_gz": ("tar.gz", lambda: os.urandom(4096), Refused, "not a readable tar.gz"),
    "empty_body": ("tar", lambda: b"", Refused, "not a readable tar"),
    "zip_sent_as_tar": ("tar", lambda: zip_of(("a.csv", b"1")), Refused, "not a readable tar"),
    "tar_gz_sent_as_zip": ("zip", lambda: tar_of(member("a.csv", b"1"), gz=True), Refused, "not a readable zip"),
    "tar_sent_as_tar_gz": ("tar.gz", lambda: tar_of(member("a.csv", b"1")), Refused, "not a readable tar.gz"),
    "truncated_tar_gz": ("tar.gz", truncated_tar_gz, Refused, "damaged"),
    "truncated_tar": ("tar", lambda: tar_of(member("a.bin", bytes(5000)))[:3000], Refused, "damaged"),
    "damaged_second_header": ("tar", bad_second_header, Refused, "damaged or truncated"),
    "unknown_format": ("rar", lambda: b"Rar!", Refused, "not one of zip, tar, tar.gz"),
}


def encrypted_zip() -> bytes:
    data = bytearray(zip_of(("secret.csv", b"1,2")))
    for header in (b"PK\x03\x04", b"PK\x01\x02"):  # the flag bits of the local and central headers
        at = data.index(header) + (6 if header == b"PK\x03\x04" else 8)
        data[at] |= 0x1
    return bytes(data)


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_a_hostile_archive_is_refused_and_nothing_is_written(case, tmp_path):
    fmt, build, error, words = HOSTILE[case]
    with pytest.raises(error) as refused:
        run(build(), fmt, tmp_path)
    assert words in str(refused.value), str(refused.value)
    assert (refused.value.status, refused.value.code) == (
        (413, "ARCHIVE_TOO_LARGE") if error is TooLarge else (400, "BAD_ARCHIVE")
    )
    assert tree(tmp_path) == []


def test_a_message_names_the_entry_escaped_and_cut_short(tmp_path):
    name = "\x1b[31m" + "x" * 300
    with pytest.raises(Refused) as refused:
        run(zip_of((name, b"x")), "zip", tmp_path)
    message = str(refused.value)
    assert "\x1b" not in message and "'\\x1b[31m" in message and "x" * 300 not in message and "..." in message


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """A real zip bomb: one deflated entry of 2 GiB of zeros (about 9 MB; zip64, as 2 GiB needs)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("zeros.bin", "w", force_zip64=True) as entry:
            block = bytes(64 << 20)
            for _ in range(2 * GIB // len(block)):
                entry.write(block)
    return out.getvalue()


def test_a_2_gib_zip_bomb_is_refused_before_anything_is_written_and_fast(zip_bomb, tmp_path):
    started = time.monotonic()
    with pytest.raises(TooLarge, match="more than 104857600 bytes"):
        run(zip_bomb, "zip", tmp_path, size=100 << 20)
    assert time.monotonic() - started < 1.0
    assert tree(tmp_path) == []


def test_a_zip_whose_directory_lies_about_a_size_is_refused(tmp_path):
    """The central directory says 10 bytes for 100 000: only 10 are read, and their CRC is wrong."""
    data = bytearray(zip_of(("a.csv", b"x" * 100_000)))
    central = data.index(b"PK\x01\x02")
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    with pytest.raises(Refused, match="damaged at the entry 'a.csv'"):
        run(bytes(data), "zip", tmp_path)
    assert tree(tmp_path) == []


def test_a_tar_gz_of_100k_entries_is_refused_at_its_first_entry_past_the_limit(tmp_path):
    headers = (tarfile.TarInfo(f"d{i % 100}/f{i}.txt").tobuf(tarfile.GNU_FORMAT) for i in range(100_000))
    data = gzip.compress(b"".join(headers) + bytes(1024), compresslevel=1)
    started = time.monotonic()
    with pytest.raises(TooLarge, match="more than 1000 entries"):
        run(data, "tar.gz", tmp_path, entries=1000)
    assert time.monotonic() - started < 1.0 and tree(tmp_path) == []


def test_the_limits_are_inclusive(tmp_path):
    data = tar_of(member("d", kind=tarfile.DIRTYPE), member("d/a", b"12345"), member("b", b"67890"))
    with pytest.raises(TooLarge):
        run(data, "tar", tmp_path, entries=2)
    with pytest.raises(TooLarge):
        run(data, "tar", tmp_path, size=9)
    assert run(data, "tar", tmp_path, entries=3, size=10) == datalab_archive.Unpacked(3, 10)


def test_a_folder_zip_unpacks_with_its_tree_and_plain_modes(tmp_path):
    data = zip_of(
        (zip_info("proj/", stat.S_IFDIR | 0o700), b""),
        (zip_info("proj/data/x.csv", stat.S_IFREG | 0o600), b"a,b\n1,2\n"),
        (zip_info("proj/run.sh", stat.S_IFREG | stat.S_ISUID | stat.S_ISGID | 0o777), b"#!/bin/sh\n"),
        (zip_info("proj/empty/", 0), b""),
        ("proj/\u00fcber \u0645\u06cc\u200c.txt", b"hi"),
    )
    assert run(data, "zip", tmp_path) == datalab_archive.Unpacked(5, 20)
    assert tree(tmp_path) == [
        "proj",
        "proj/data",
        "proj/data/x.csv",
        "proj/empty",
        "proj/run.sh",
        "proj/\u00fcber \u0645\u06cc\u200c.txt",
    ]
    assert (tmp_path / "proj/data/x.csv").read_bytes() == b"a,b\n1,2\n"
    modes = {p: stat.S_IMODE((tmp_path / p).stat().st_mode) for p in tree(tmp_path)}
    assert modes == {
        "proj": 0o755,
        "proj/data": 0o755,
        "proj/data/x.csv": 0o644,
        "proj/empty": 0o755,
        "proj/run.sh": 0o755,
        "proj/\u00fcber \u0645\u06cc\u200c.txt": 0o644,
    }


def test_a_tar_made_with_dot_unpacks_without_it(tmp_path):
    data = tar_of(member("./", kind=tarfile.DIRTYPE), member("./a.csv", b"1"), member("./d/b.csv", b"2"), gz=True)
    assert run(data, "tar.gz", tmp_path) == datalab_archive.Unpacked(2, 2)
    assert tree(tmp_path) == ["a.csv", "d", "d/b.csv"]


def test_an_empty_archive_unpacks_to_nothing(tmp_path):
    assert run(tar_of(), "tar", tmp_path) == datalab_archive.Unpacked(0, 0)
    assert run(zip_of(), "zip", tmp_path) == datalab_archive.Unpacked(0, 0)


def test_a_damaged_entry_midway_removes_what_was_written(tmp_path):
    """The listing is whole, so writing starts; the third entry's content fails its CRC."""
    data = bytearray(zip_of(("d/a.csv", b"A" * 1000), ("d/e/b.csv", b"B" * 1000), ("c.csv", b"C" * 1000), method=0))
    at = data.index(b"C" * 1000)
    data[at] = ord("X")
    with pytest.raises(Refused, match="damaged at the entry 'c.csv'"):
        run(bytes(data), "zip", tmp_path)
    assert tree(tmp_path) == []


def test_what_is_already_there_is_never_replaced_nor_followed(tmp_path):
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (work / "a.csv").write_bytes(b"mine")
    (work / "link").symlink_to(outside)
    (work / "kept").mkdir()
    for entries in ([("a.csv", b"theirs")], [("new.csv", b"1"), ("link/x", b"x")], [("link", b"x")]):
        with pytest.raises(Occupied) as refused:
            run(zip_of(*entries), "zip", work)
        assert refused.value.status == 409 and refused.value.code == "ALREADY_EXISTS"
    assert (work / "a.csv").read_bytes() == b"mine" and list(outside.iterdir()) == []
    assert tree(work) == ["a.csv", "kept", "link"]
    assert run(zip_of(("kept/new.csv", b"1")), "zip", work).entries == 1  # an existing folder is merged into
    assert tree(work) == ["a.csv", "kept", "kept/new.csv", "link"]


FILE_LIMIT = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import datalab_archive as a
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # past it, a write fails (EFBIG)
try:
    with open(sys.argv[2], "rb") as f:
        a.unpack(f, "tar.gz", sys.argv[3], a.Limits(100, 10**9))
    print(json.dumps({"status": 201}))
except a.Refused as e:
    print(json.dumps({"status": e.status, "code": e.code, "message": str(e)}))
"""


def test_a_write_that_finds_no_room_removes_what_was_written(tmp_path):
    """The disk filling up (here: a file-size limit, EFBIG; ENOSPC alike) is 413, and nothing stays."""
    archive, work = tmp_path / "a.tar.gz", tmp_path / "work"
    work.mkdir()
    archive.write_bytes(
        tar_of(member("d/a.csv", b"1,2\n"), member("d/e/f/big.bin", os.urandom(200_000)), member("z", b"z"), gz=True)
    )
    script = [sys.executable, "-c", FILE_LIMIT, str(ROOT / "image"), str(archive), str(work)]
    answer = json.loads(subprocess.run(script, capture_output=True, check=True, text=True).stdout)
    assert answer["status"] == 413 and answer["code"] == "ARCHIVE_TOO_LARGE" and "full" in answer["message"]
    assert tree(work) == []


# --- pack ---


def unpacked(pieces) -> dict[str, tarfile.TarInfo | bytes]:
    """A packed archive read back: name -> the content of a file, or the TarInfo of a folder."""
    data = b"".join(pieces)
    assert data[:2] == b"\x1f\x8b" and data[8] == 4  # gzip; XFL 4: the fastest level
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for info in tar:
            assert info.isreg() or info.isdir(), info.name
            assert not info.name.startswith(("/", "./")) and not info.mode & 0o7000
            out[info.name] = tar.extractfile(info).read() if info.isreg() else info
    return out


def test_pack_holds_plain_files_and_folders_and_skips_the_rest(tmp_path):
    work = tmp_path / "work"
    (work / "sub" / "deeper").mkdir(parents=True)
    (work / "empty").mkdir()
    blob = os.urandom(3 << 20)
    (work / "sub" / "blob.bin").write_bytes(blob)
    (work / "a.csv").write_bytes(b"1,2\n")
    (work / "run.sh").write_bytes(b"#!/bin/sh\n")
    (work / "run.sh").chmod(0o4755)
    (work / "\u00fcber.txt").write_bytes(b"")
    (work / "passwd").symlink_to("/etc/passwd")
    (work / "etc").symlink_to("/etc")
    os.mkfifo(work / "fifo")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(work / "sock"))
        pieces = list(pack(str(work)))
    bound = datalab_archive.PIECE + datalab_archive.READ + 4096
    assert len(pieces) > 4 and max(map(len, pieces)) <= bound  # streamed, in bounded pieces
    archive = unpacked(pieces)
    assert sorted(archive) == ["a.csv", "empty", "run.sh", "sub", "sub/blob.bin", "sub/deeper", "\u00fcber.txt"]
    assert archive["sub/blob.bin"] == blob and archive["a.csv"] == b"1,2\n" and archive["\u00fcber.txt"] == b""
    assert archive["sub"].isdir() and archive["run.sh"] == b"#!/bin/sh\n"


def test_pack_skips_a_file_that_vanishes_and_pads_one_that_shrinks(tmp_path):
    data = os.urandom(4 << 20)
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "c.csv").write_bytes(b"gone")
    pieces = pack(str(tmp_path))
    first = [next(pieces)]  # "a.bin" is being read
    (tmp_path / "c.csv").unlink()
    os.truncate(tmp_path / "a.bin", 1000)
    archive = unpacked(first + list(pieces))
    assert sorted(archive) == ["a.bin"]  # the archive is whole, without c.csv
    packed = archive["a.bin"]
    assert len(packed) == 4 << 20 and packed[:1000] == data[:1000] and packed[-1000:] == bytes(1000)


def test_pack_then_unpack_gives_the_same_tree(tmp_path):
    source, copy = tmp_path / "source", tmp_path / "copy"
    (source / "a" / "b").mkdir(parents=True)
    copy.mkdir()
    for i in range(50):
        (source / "a" / f"{i}.txt").write_text(str(i) * i)
    (source / "a" / "b" / "tool").write_bytes(b"#!/bin/sh\n")
    (source / "a" / "b" / "tool").chmod(0o755)
    data = b"".join(pack(str(source)))
    result = run(data, "tar.gz", copy)
    assert result.entries == 53 and tree(copy) == tree(source)
    for path in tree(source):
        left, right = source / path, copy / path
        assert left.is_dir() == right.is_dir()
        if left.is_file():
            assert hashlib.sha256(left.read_bytes()).digest() == hashlib.sha256(right.read_bytes()).digest()
    assert stat.S_IMODE((copy / "a" / "b" / "tool").stat().st_mode) == 0o755


def test_pack_of_an_empty_folder_is_an_empty_tar_gz(tmp_path):
    data = b"".join(pack(str(tmp_path)))
    assert zlib.decompress(data, 31) == bytes(1024)  # only the end-of-archive blocks
