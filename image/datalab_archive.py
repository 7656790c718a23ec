"""The working directory as one archive, and archives unpacked into it: the pure part of the
datalab_work server extension (standard library only, so it runs on the image's Python 3.11 and is
tested without Jupyter).

pack() streams a tar.gz of a directory as it reads it. unpack() takes an archive from a hostile
uploader: every entry's name, kind and declared size is checked before anything is written, only
plain files and folders are written, below the root and never through a link, and whatever was
written is removed again when anything fails.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import BinaryIO

FORMATS = ("zip", "tar", "tar.gz")
GZIP_LEVEL = 1  # the proxy waits for the archive when it stops an instance: speed over size
PIECE = 256 << 10  # compressed bytes pack() gathers before it yields them
READ = 256 << 10  # bytes read from a file (or an archive's entry) at a time
MAX_PATH_BYTES = 4095  # an entry's whole name: what Linux tools take as one path (PATH_MAX)
LABEL_CHARS = 80  # of an entry's name in a message
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write that failed for want of room
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # (root_dir itself may be reached through a link)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_KINDS = {  # what an entry other than a file or folder is, in words
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}
_TAR_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


def _load_filename_rule() -> Callable[[str], str]:
    """The proxy's own rule for a filename (addon/inputs.py check_filename), so that one rule serves
    an uploaded file and every part of an archive's names. The image has it beside this file (as
    datalab_inputs.py, scripts/build-image.sh); the repository in addon/. Loaded by path under a
    private name: the proxy's modules are not on the server's path."""
    here = Path(__file__).resolve().parent
    for path in (here / "datalab_inputs.py", here.parent / "addon" / "inputs.py"):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("_datalab_filename_rule", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.check_filename
    raise ImportError(f"the proxy's filename rule (datalab_inputs.py or ../addon/inputs.py) is missing near {here}")


check_filename = _load_filename_rule()


class Refused(Exception):
    """Why an archive was not unpacked: an HTTP status, a code and a sentence a person can act on."""

    status = 400
    code = "BAD_ARCHIVE"


class TooLarge(Refused):
    status = 413
    code = "ARCHIVE_TOO_LARGE"


class Occupied(Refused):
    """An entry's place is already taken in the working directory (nothing there is replaced)."""

    status = 409
    code = "ALREADY_EXISTS"


@dataclass(frozen=True)
class Limits:
    max_entries: int
    max_bytes: int


@dataclass(frozen=True)
class Unpacked:
    entries: int
    bytes: int


@dataclass(frozen=True)
class Raw:
    """An archive's entry as its format lists it, before any check."""

    name: str
    kind: str  # "file", "dir", or what else it is in words ("a symbolic link")
    size: int  # declared
    executable: bool
    mtime: float | None
    member: Any  # the ZipInfo or TarInfo its content is read through
    refusal: str = ""  # why it cannot be read whatever its name (encrypted...)


@dataclass(frozen=True)
class Entry:
    """A checked entry: its path below the root, one checked name per part."""

    parts: tuple[str, ...]
    is_dir: bool
    size: int
    executable: bool
    mtime: float | None
    member: Any


def label(name: str) -> str:
    """An entry's name for a message: quoted, escaped, and cut short."""
    return repr(name if len(name) <= LABEL_CHARS else name[:LABEL_CHARS] + "...")


def _reason(error: BaseException) -> str:
    return (str(error) or type(error).__name__)[:200]


@contextlib.contextmanager
def _damaged(what: str) -> Iterator[None]:
    """Whatever a parser raises on hostile bytes is the archive's fault (a bad archive, not a crash)."""
    try:
        yield
    except Refused:
        raise
    except Exception as e:
        raise Refused(f"{what}: {_reason(e)}") from e


# --- unpack ---


def unpack(archive: BinaryIO, fmt: str, root: str, limits: Limits) -> Unpacked:
    """Unpack `archive` (a seekable file) into the directory `root`: all of it, or nothing."""
    root_fd = os.open(root, _OPEN_ROOT)
    try:
        with _opened(archive, fmt) as (items, open_member):
            entries = plan(items, limits)
            _check_free(root_fd, entries)
            written = _write_all(root_fd, entries, open_member, limits.max_bytes)
    finally:
        os.close(root_fd)
    return Unpacked(len(entries), written)


@contextlib.contextmanager
def _opened(archive: BinaryIO, fmt: str) -> Iterator[tuple[Iterator[Raw], Callable[[Any], BinaryIO]]]:
    """The archive's entries as Raw, and how to read one's content."""
    if fmt == "zip":
        with _damaged("the upload is not a readable zip archive"):
            zf = zipfile.ZipFile(archive)
        with zf:
            yield _zip_items(zf), zf.open
    elif fmt in ("tar", "tar.gz"):
        mode = "r:" if fmt == "tar" else "r:gz"
        with _damaged(f"the upload is not a readable {fmt} archive"):
            tar = tarfile.open(fileobj=archive, mode=mode, encoding="utf-8", errors="surrogateescape")
        with tar:
            yield _tar_items(tar), tar.extractfile
    else:
        raise Refused(f"the archive format {label(fmt)} is not one of {', '.join(FORMATS)}")


def _zip_items(zf: zipfile.ZipFile) -> Iterator[Raw]:
    for info in zf.infolist():  # (read from the central directory when the archive was opened)
        mode = info.external_attr >> 16
        yield Raw(
            info.filename,
            _zip_kind(info),
            info.file_size,
            bool(mode & 0o111),
            _zip_mtime(info),
            info,
            _zip_refusal(info),
        )


def _zip_kind(info: zipfile.ZipInfo) -> str:
    """A zip entry is a folder by its trailing '/'; Unix zips add the kind in its mode (a link's too)."""
    is_dir = info.filename.endswith("/")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind in _KINDS:
        return _KINDS[kind]
    if (kind == stat.S_IFDIR and not is_dir) or (kind == stat.S_IFREG and is_dir):
        return "an entry whose name and kind disagree"
    return "dir" if is_dir else "file"


def _zip_refusal(info: zipfile.ZipInfo) -> str:
    if info.flag_bits & 0x1:
        return "it is encrypted"
    if info.compress_type not in _ZIP_METHODS:
        return f"it is compressed with method {info.compress_type}, which cannot be read here"
    return ""


def _zip_mtime(info: zipfile.ZipInfo) -> float | None:
    with contextlib.suppress(Exception):
        return time.mktime((*info.date_time, 0, 0, -1))
    return None


def _tar_items(tar: tarfile.TarFile) -> Iterator[Raw]:
    while True:
        with _damaged("the archive is damaged"):
            member = tar.next()
        if member is None:
            break
        yield _tar_raw(member)
    with _damaged("the archive is damaged or truncated"):
        _check_tar_end(tar)


def _tar_raw(member: tarfile.TarInfo) -> Raw:
    if member.isdir():
        kind = "dir"
    elif member.isreg():
        kind = "file"
    else:
        kind = _TAR_KINDS.get(member.type, f"an entry of tar type {member.type!r}")
    size = member.size if kind == "file" else 0
    return Raw(member.name, kind, size, bool(member.mode & 0o111), member.mtime, member)


def _check_tar_end(tar: tarfile.TarFile) -> None:
    """tarfile ends its listing quietly at a damaged header or where the data stops: only an
    archive that goes on to its end-of-archive block (512 zero bytes) is whole."""
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise Refused(f"the archive is damaged or truncated after its entry number {len(tar.members)}")


def plan(items: Iterable[Raw], limits: Limits) -> list[Entry]:
    """Every entry checked (name, kind, count and declared sizes) before anything is written; the
    count and the sizes stop the listing as soon as they are past the limits."""
    entries: list[Entry] = []
    seen: set[tuple[str, ...]] = set()
    total = 0
    for count, raw in enumerate(items, start=1):
        if count > limits.max_entries:
            raise TooLarge(
                f"the archive has more than {limits.max_entries} entries, the most the working directory takes"
            )
        entry = _entry(raw)
        total += entry.size
        if total > limits.max_bytes:
            raise TooLarge(
                f"the archive's files hold more than {limits.max_bytes} bytes in all (at entry {label(raw.name)}), "
                "more than the working directory takes"
            )
        if not entry.parts:
            continue  # "./": the root itself
        if entry.parts in seen:
            raise Refused(f"the entry {label(raw.name)} appears twice in the archive; keep one")
        seen.add(entry.parts)
        entries.append(entry)
    _check_tree(entries)
    return entries


def _entry(raw: Raw) -> Entry:
    """The entry, if it is a plain file or folder whose every name part passes the filename rule."""

    def refuse(why: str) -> Refused:
        return Refused(f"the entry {label(raw.name)} cannot be unpacked: {why}; change it in the archive and try again")

    if raw.kind not in ("file", "dir"):
        raise refuse(f"it is {raw.kind}, and only files and folders are taken")
    if raw.refusal:
        raise refuse(raw.refusal)
    name = raw.name
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise refuse("its name is not valid UTF-8") from None
    if size > MAX_PATH_BYTES:
        raise refuse(f"its name is longer than {MAX_PATH_BYTES} bytes")
    if name.startswith("/"):
        raise refuse("its name is absolute (it starts with '/')")
    while name.startswith("./"):  # how `tar -C dir .` names everything
        name = name[2:]
    if raw.kind == "dir":
        name = name.removesuffix("/")
        if name in ("", "."):
            return Entry((), True, 0, False, None, raw.member)
    parts = tuple(name.split("/"))
    for part in parts:
        try:
            check_filename(part)
        except ValueError as e:
            raise refuse(f"{label(part)} in its name is not allowed ({e})") from None
    return Entry(parts, raw.kind == "dir", raw.size, raw.executable, raw.mtime, raw.member)


def _check_tree(entries: list[Entry]) -> None:
    """No file where another entry needs a folder ('a' a file and 'a/b' in the archive)."""
    folders = {e.parts[:i] for e in entries for i in range(1, len(e.parts))}
    for entry in entries:
        if not entry.is_dir and entry.parts in folders:
            name = label("/".join(entry.parts))
            raise Refused(f"the entry {name} is a file, and other entries are in a folder of that name; keep one")


def _check_free(root_fd: int, entries: list[Entry]) -> None:
    """Nothing already in the working directory is replaced: a file's place must be free, a folder's
    free or a folder (not a link to one). Checked before writing; writing checks again (O_EXCL, O_NOFOLLOW)."""
    folders = {e.parts[:i] for e in entries for i in range(1, len(e.parts))}
    folders |= {e.parts for e in entries if e.is_dir}
    for parts in sorted(folders):
        found = _lstat(root_fd, parts)
        if found is not None and not stat.S_ISDIR(found.st_mode):
            raise _occupied(parts, "and is not a folder")
    for entry in entries:
        if not entry.is_dir and _lstat(root_fd, entry.parts) is not None:
            raise _occupied(entry.parts, "(nothing there is replaced)")


def _lstat(root_fd: int, parts: tuple[str, ...]) -> os.stat_result | None:
    try:
        return os.stat("/".join(parts), dir_fd=root_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _occupied(parts: tuple[str, ...], why: str) -> Occupied:
    return Occupied(f"{label('/'.join(parts))} is already in the working directory {why}; remove it first")


def _write_all(root_fd: int, entries: list[Entry], open_member: Callable[[Any], BinaryIO], room: int) -> int:
    """Write the entries; on any failure remove what was written (files, then the folders made)."""
    made: list[tuple[tuple[str, ...], bool]] = []  # (parts, is_dir), in the order they were made
    written = 0
    try:
        for entry in entries:
            if entry.is_dir:
                os.close(_open_dirs(root_fd, entry.parts, made))
                continue
            parent = _open_dirs(root_fd, entry.parts[:-1], made)
            try:
                written += _write_file(parent, entry, open_member, room - written, made)
            finally:
                os.close(parent)
    except BaseException:
        _remove(root_fd, made)
        raise
    return written


def _open_dirs(root_fd: int, parts: tuple[str, ...], made: list | None) -> int:
    """A descriptor of the folder `parts` below the root, each part opened without following a link;
    missing folders are made (0755) and noted in `made`, unless `made` is None."""
    fd = os.dup(root_fd)
    try:
        for depth, part in enumerate(parts, start=1):
            child = _enter(fd, part, parts[:depth], made)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _enter(fd: int, part: str, path: tuple[str, ...], made: list | None) -> int:
    new = False
    if made is not None:
        try:
            os.mkdir(part, 0o755, dir_fd=fd)
            made.append((path, True))
            new = True
        except FileExistsError:
            pass
        except OSError as e:
            _raise_if_full(e)
            raise
    try:
        child = os.open(part, _OPEN_DIR, dir_fd=fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _occupied(path, "and is not a folder") from None
        raise
    if new:
        os.fchmod(child, 0o755)  # (mkdir's mode went through the umask)
    return child


def _write_file(parent: int, entry: Entry, open_member: Callable[[Any], BinaryIO], room: int, made: list) -> int:
    """One file, new (never over anything), the notebook user's, 0644 or 0755 whatever the archive says."""
    try:
        fd = os.open(entry.parts[-1], _NEW_FILE, 0o600, dir_fd=parent)
    except FileExistsError:
        raise _occupied(entry.parts, "(nothing there is replaced)") from None
    made.append((entry.parts, False))
    try:
        with open(fd, "wb") as out:
            copied = _copy(entry, open_member, out, room)
            out.flush()
            os.fchmod(fd, 0o755 if entry.executable else 0o644)
            if entry.mtime is not None:
                with contextlib.suppress(OSError, OverflowError, ValueError):
                    os.utime(fd, (entry.mtime, entry.mtime))
    except OSError as e:
        _raise_if_full(e)
        raise
    return copied


def _copy(entry: Entry, open_member: Callable[[Any], BinaryIO], out: BinaryIO, room: int) -> int:
    """The entry's content into `out`, its real bytes counted (declared sizes are not trusted alone)."""
    name = label("/".join(entry.parts))
    copied = 0
    with _damaged(f"the archive is damaged at the entry {name}"):
        source = open_member(entry.member)
    with source:
        while True:
            with _damaged(f"the archive is damaged at the entry {name}"):
                piece = source.read(READ)
            if not piece:
                break
            copied += len(piece)
            if copied > room:
                raise TooLarge(f"the archive's files hold more bytes than the working directory takes (at {name})")
            out.write(piece)
    if copied != entry.size:
        raise Refused(
            f"the archive is damaged: the entry {name} holds {copied} bytes, not the {entry.size} it declares"
        )
    return copied


def _raise_if_full(error: OSError) -> None:
    """A write that failed for want of room is the archive's size (anything else stays an OSError)."""
    if error.errno in FULL:
        raise TooLarge(
            f"the working directory is full: the archive does not fit ({os.strerror(error.errno)})"
        ) from error


def _remove(root_fd: int, made: list[tuple[tuple[str, ...], bool]]) -> None:
    """Undo a partial unpack: what was made, newest first (a folder someone filled meanwhile stays)."""
    for parts, is_dir in reversed(made):
        with contextlib.suppress(OSError, Refused):
            parent = _open_dirs(root_fd, parts[:-1], None)
            try:
                if is_dir:
                    os.rmdir(parts[-1], dir_fd=parent)
                else:
                    os.unlink(parts[-1], dir_fd=parent)
            finally:
                os.close(parent)


# --- pack ---


def pack(root: str, piece: int = PIECE) -> Iterator[bytes]:
    """The directory `root` as a tar.gz, yielded piece by piece as it is read (never whole in memory).

    Entries are named relative to `root`; only plain files and folders go in (links, devices, FIFOs
    and sockets are skipped, and no link is followed). A file that vanishes or cannot be read is
    skipped; one that shrinks while it is read is padded with zeros to the size its header gave."""
    gz = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: the gzip format
    pending = bytearray()
    with contextlib.closing(_tar_stream(root)) as blocks:
        for block in blocks:
            pending += gz.compress(block)
            if len(pending) >= piece:
                yield bytes(pending)
                pending.clear()
    pending += gz.flush()
    yield bytes(pending)


def _tar_stream(root: str) -> Iterator[bytes]:
    """The tar, folder by folder (depth first, names sorted), one folder descriptor open at a time."""
    pending: list[tuple[str, tuple[int, int] | None]] = [("", None)]
    while pending:
        rel, identity = pending.pop()
        fd = _open_listed(root, rel, identity)
        if fd is None:
            continue
        try:
            if rel:
                yield _header(rel, os.fstat(fd), is_dir=True)
            folders = []
            for entry in _listing(fd):
                path = f"{rel}/{entry.name}" if rel else entry.name
                kind = _kind(entry)
                if kind == "file":
                    yield from _file(fd, entry.name, path)
                elif kind is not None:
                    folders.append((path, kind))
            pending.extend(reversed(folders))
        finally:
            os.close(fd)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # the end-of-archive blocks


def _open_listed(root: str, rel: str, identity: tuple[int, int] | None) -> int | None:
    """The folder `rel`, if it is still the one its parent listed (not a link put in its place)."""
    try:
        fd = os.open(os.path.join(root, rel) if rel else root, _OPEN_DIR if rel else _OPEN_ROOT)
    except OSError:
        return None
    found = os.fstat(fd)
    if identity is not None and (found.st_dev, found.st_ino) != identity:
        os.close(fd)
        return None
    return fd


def _kind(entry: os.DirEntry) -> str | tuple[int, int] | None:
    """The entry as "file", as a folder's (device, inode), or None: anything else (links are not followed)."""
    try:
        if entry.is_dir(follow_symlinks=False):
            found = entry.stat(follow_symlinks=False)
            return (found.st_dev, found.st_ino)
        return "file" if entry.is_file(follow_symlinks=False) else None
    except OSError:
        return None


def _listing(fd: int) -> list[os.DirEntry]:
    try:
        with os.scandir(fd) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError:
        return []


def _file(dir_fd: int, name: str, path: str) -> Iterator[bytes]:
    """One file's header and content, if it can be opened and is (still) a plain file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            return
        yield _header(path, found, is_dir=False)
        yield from _content(fd, found.st_size)
    finally:
        os.close(fd)


def _content(fd: int, size: int) -> Iterator[bytes]:
    """Exactly `size` bytes, as the header said: what is read, then zeros if the file fell short."""
    left = size
    while left > 0:
        try:
            data = os.read(fd, min(READ, left))
        except OSError:
            data = b""
        if not data:
            break
        left -= len(data)
        yield data
    while left > 0:
        yield bytes(min(READ, left))
        left -= min(READ, left)
    yield tarfile.NUL * (-size % tarfile.BLOCKSIZE)


def _header(path: str, found: os.stat_result, is_dir: bool) -> bytes:
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = stat.S_IMODE(found.st_mode) & 0o777  # never set-id bits
    info.size = 0 if is_dir else found.st_size
    info.mtime = max(0, int(found.st_mtime))
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
