"""The single binary's bundle: packaging/bootloader.c with a directory appended, and its reader.

    python packaging/bundle.py BOOTLOADER DIRECTORY OUTPUT

writes OUTPUT: the bootloader, then every file of DIRECTORY (PyInstaller's
one-directory build of the launcher) deflated, then the index the bootloader
reads, then the trailer. The format is bootloader.c's; the index lists
directories before what they hold and in a fixed order, so that the same
directory always makes the same bytes, and the bundle's id (the start of the
SHA-256 of everything after the bootloader) names the copy it unpacks.
"""
import hashlib
import os
import stat
import struct
import sys
import zlib

MAGIC = b"LNCHBNDL"
TRAILER = struct.Struct("<8sQQI4x16s")  # magic, index offset, index size, index CRC-32, id
ENTRY = struct.Struct("<IIQQQI4x")  # kind, mode, size, data offset, data size, path length (with its NUL)
DIRECTORY, FILE, SYMLINK = 0, 1, 2


def walk(directory: str):
    """(relative path, kind, mode, content) of everything under directory, parents first, in a fixed order."""
    for parent, directories, files in os.walk(directory):
        directories.sort()
        for name in sorted(directories + files):
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, directory)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                yield relative, SYMLINK, 0o777, os.readlink(path).encode()
            elif stat.S_ISDIR(info.st_mode):
                yield relative, DIRECTORY, 0o755, b""
            else:
                with open(path, "rb") as content:
                    yield relative, FILE, 0o755 if info.st_mode & 0o111 else 0o644, content.read()


def write(bootloader: str, directory: str, output: str) -> None:
    with open(bootloader, "rb") as program:
        head = program.read()
    data, index, count = bytearray(), bytearray(), 0
    for relative, kind, mode, content in walk(directory):
        stored = zlib.compress(content, 9) if kind == FILE else content
        path = relative.encode() + b"\0"
        index += ENTRY.pack(kind, mode, len(content), len(head) + len(data), len(stored), len(path)) + path
        data += stored
        count += 1
    index = struct.pack("<I", count) + index
    bundle = bytes(data) + index
    bundle_id = hashlib.sha256(bundle).hexdigest()[:16].encode()
    trailer = TRAILER.pack(MAGIC, len(head) + len(data), len(index), zlib.crc32(index), bundle_id)
    part = output + ".part"
    with open(part, "wb") as out:
        out.write(head + bundle + trailer)
    os.chmod(part, 0o755)
    os.replace(part, output)


def trailer(whole: bytes) -> tuple:
    """A binary's trailer: magic, index offset, index size, index CRC-32, id."""
    fields = TRAILER.unpack_from(whole, len(whole) - TRAILER.size)
    if fields[0] != MAGIC:
        raise ValueError("no bundle")
    return fields


def entries(whole: bytes):
    """(path, kind, data offset, data size) of each entry of a binary's bundle, in the index's order."""
    _, index_offset, _, _, _ = trailer(whole)
    [count] = struct.unpack_from("<I", whole, index_offset)
    at = index_offset + 4
    for _ in range(count):
        kind, _, _, offset, stored, path_length = ENTRY.unpack_from(whole, at)
        at += ENTRY.size
        yield whole[at:at + path_length - 1].decode(), kind, offset, stored
        at += path_length


def read(binary: str) -> tuple[str, dict[str, bytes]]:
    """The bundle's id and its files' contents by path (directories and symlinks left out)."""
    with open(binary, "rb") as program:
        whole = program.read()
    bundle_id = trailer(whole)[-1].decode()
    return bundle_id, {path: zlib.decompress(whole[offset:offset + stored])
                       for path, kind, offset, stored in entries(whole) if kind == FILE}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.split("\n\n")[1].strip())
    write(*sys.argv[1:])
