"""The NDJSON body of a commit, parsed as it arrives, so that server memory does not grow with file sizes.

The Hub's client sends each file it was told is "regular" base64-encoded in one JSON line,
`{"key": "file", "value": {"content": "<base64>", "path": ..., "encoding": "base64"}}`, and huggingface_hub
with hf_xet (its default) is told "regular" for every file here (see server.hf_commit), so one line can be
gigabytes. A line of up to SMALL_LINE bytes is parsed whole. In a longer one, the string value of its
`content` member is decoded as it streams, straight into a staged object (registry.hubs.staging: hashed
on the way), and the line is parsed with that string left empty. Every file's content goes to the
staging as its line ends; only paths and entries are kept. The decoded size of the commit's files is
bounded by `limit` (413 otherwise).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from registry.hubs.staging import StagedWriter, Staging
from registry.hubs.store import FileEntry
from registry.nesting import loads_json
from server.errors import HubHTTPError
from server.hf_common import valid_path

SMALL_LINE = 1 << 20  # a line longer than this must be a file whose content is what makes it long
LFS_SIZE = 10 * 1000 * 1000  # the Hub keeps files of 10 MB and more in LFS; so are they listed here


@dataclass
class CommitOps:
    header: dict = field(default_factory=dict)
    added: dict[str, FileEntry] = field(default_factory=dict)  # contents in the staging
    lfs: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # path -> (sha256, size) uploaded via LFS
    deleted: list[str] = field(default_factory=list)
    deleted_folders: list[str] = field(default_factory=list)
    decoded: int = 0  # bytes of file content in the body


def parse_commit(batches: Iterable[bytes], staging: Staging, limit: int) -> CommitOps:
    """The operations of a commit body (the client's NDJSON), its files' contents written to `staging`.
    HubHTTPError 400 for a malformed body, 413 when the files come to more than `limit` bytes."""
    parser = _Parser(staging, limit)
    for batch in batches:
        parser.feed(batch)
    parser.feed(b"\n")  # a last line without its newline
    if parser.sink is not None:
        raise HubHTTPError(400, f"commit line {parser.n + 1}: the body ends inside a file's content")
    if not parser.ops.header.get("summary"):
        raise HubHTTPError(400, "the commit has no header with a summary (commit message)")
    return parser.ops


class _Parser:
    def __init__(self, staging: Staging, limit: int):
        self.staging, self.limit = staging, limit
        self.ops = CommitOps()
        self.line = bytearray()  # the current line; a streamed content string is left out (kept as "")
        self.n = 0  # lines ended so far
        self.sink: _Base64Sink | None = None  # the content string being streamed
        self.streamed: StagedWriter | None = None  # the current line's streamed content, once whole
        self.cap = SMALL_LINE  # the length of self.line past which its content must be streamed

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if self.sink is not None:
                pos = self._content(data, pos)
                continue
            nl = data.find(b"\n", pos)
            self.line += data[pos : len(data) if nl < 0 else nl]
            if nl >= 0:
                self._end_line()
                pos = nl + 1
            else:
                pos = len(data)
                if len(self.line) > self.cap:
                    self._start_streaming()

    def _where(self) -> str:
        return f"commit line {self.n + 1}"

    def _start_streaming(self) -> None:
        start = None if self.streamed is not None else content_start(self.line)
        if start is None:
            raise HubHTTPError(
                413, f"{self._where()}: over {SMALL_LINE} bytes, and not because of a file's base64 'content'"
            )
        tail = bytes(self.line[start:])
        del self.line[start:]  # ends with the string's opening quote
        self.sink = _Base64Sink(self.staging.writer(), self._where(), self.limit - self.ops.decoded, self.limit)
        self.feed(tail)

    def _content(self, data: bytes, pos: int) -> int:
        """Stream content up to its closing quote; the position after what was taken."""
        quote = data.find(b'"', pos)
        self.sink.write(data[pos : len(data) if quote < 0 else quote])
        if quote < 0:
            return len(data)
        self.streamed = self.sink.finish()
        self.sink = None
        self.line += b'"'
        self.cap = len(self.line) + SMALL_LINE  # the rest of the line: as much again as a small line
        return quote + 1

    def _end_line(self) -> None:
        text = bytes(self.line)
        self.line.clear()
        self.cap = SMALL_LINE
        streamed, self.streamed = self.streamed, None
        where = self._where()
        self.n += 1
        if not text.strip():
            return
        try:
            item = loads_json(text, where)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError) as e:
            why = f" ({e})" if isinstance(e, ValueError) else ""
            raise HubHTTPError(400, f"{where}: not a JSON object with 'key' and 'value'{why}") from None
        if not isinstance(value, dict):
            raise HubHTTPError(400, f"{where}: 'value' must be a JSON object")
        if streamed is not None and key != "file":
            raise HubHTTPError(400, f"{where}: only a file's content may be long")
        ops = self.ops
        if key == "header":
            ops.header = value
        elif key == "file":
            path = valid_path(str(value.get("path", "")))
            if value.get("encoding", "base64") != "base64":
                raise HubHTTPError(400, f"{where}: {path}: only base64 content is taken")
            if streamed is not None:
                entry = self.staging.entry(streamed, lfs=streamed.size >= LFS_SIZE)
                ops.decoded += streamed.size
            else:
                data = _b64decode(value.get("content", ""), f"{where}: {path}")
                ops.decoded += len(data)
                if ops.decoded > self.limit:
                    raise _over(self.limit)
                entry = self.staging.add(data)
            ops.added[path] = entry
        elif key == "deletedFile":
            ops.deleted.append(valid_path(str(value.get("path", ""))))
        elif key == "deletedFolder":
            ops.deleted_folders.append(valid_path(str(value.get("path", "")).rstrip("/")))
        elif key == "lfsFile":
            path = valid_path(str(value.get("path", "")))
            oid, size = value.get("oid"), value.get("size")
            # a copy of an LFS file names its oid only (the client's CommitOperationCopy)
            if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not isinstance(size, int | None):
                raise HubHTTPError(400, f"{where}: {path}: an lfsFile needs algo sha256, oid and size")
            ops.lfs[path] = (oid, size)
        elif key == "copyFile":
            raise HubHTTPError(400, f"{where}: copyFile is not supported (the client copies through lfsFile)")
        else:
            raise HubHTTPError(400, f"{where}: unknown operation {key!r}")


def _over(limit: int) -> HubHTTPError:
    return HubHTTPError(
        413, f"the commit's files are over this hub's limit of {limit} bytes (w2wreg serve --max-upload-mb)"
    )


def _b64decode(content: object, where: str) -> bytes:
    try:
        return base64.b64decode(content if isinstance(content, str) else "", validate=True)
    except (binascii.Error, ValueError):
        raise HubHTTPError(400, f"{where}: content is not valid base64") from None


_BARE = re.compile(rb'[^\s{}\[\]:,"]+')  # a number, true, false, null


def _string_end(line: bytes | bytearray, pos: int) -> int:
    """The index of the quote that closes the string starting at `pos`, or -1 if it does not end in `line`."""
    while (q := line.find(b'"', pos)) >= 0:
        k = q
        while k > pos and line[k - 1] == 0x5C:  # backslashes before the quote: an odd number escapes it
            k -= 1
        if (q - k) % 2 == 0:
            return q
        pos = q + 1
    return -1


def content_start(line: bytes | bytearray) -> int | None:
    """Where the string value of the member `content` of the line's `value` object starts (just after its
    opening quote; the string may end in `line` or not); None when there is no such string in `line`.
    Strings are skipped with find (a long one costs no Python loop nor a regex's backtracking stack)."""
    depth, key, last, pos = 0, None, None, 0  # last: the previous token; a key is a string followed by ':'
    while pos < len(line):
        c = line[pos : pos + 1]
        if c.isspace():
            pos += 1
            continue
        if c == b'"':
            if key == "content" and last == b":" and depth == 2:
                return pos + 1
            end = _string_end(line, pos + 1)
            if end < 0:
                return None
            last, key, pos = bytes(line[pos : end + 1]), None, end + 1
            continue
        if c == b":" and last is not None and last.startswith(b'"'):
            key, last, pos = json.loads(last), c, pos + 1
            continue
        if c in (b"{", b"["):
            depth += 1
        elif c in (b"}", b"]"):
            depth -= 1
        elif c != b",":
            m = _BARE.match(line, pos)
            if m is None:
                return None
            last, key, pos = m.group(), None, m.end()
            continue
        last, key, pos = c, None, pos + 1
    return None


if sys.version_info >= (3, 11):

    def _decode_block(block: bytes) -> bytes:
        return binascii.a2b_base64(block, strict_mode=True)
else:

    def _decode_block(block: bytes) -> bytes:
        return base64.b64decode(block, validate=True)


class _Base64Sink:
    """A base64 string arriving in pieces (as JSON text: `\\/` may stand for `/`), decoded into a writer in
    blocks of whole quads; padding only at the very end."""

    def __init__(self, writer: StagedWriter, where: str, room: int, limit: int):
        self.writer, self.where, self.room, self.limit = writer, where, room, limit
        self.carry = b""  # < 4 characters of an incomplete quad
        self.escape = False  # the last piece ended in a backslash
        self.padded = False  # a quad with '=' was seen: nothing may follow

    def _bad(self) -> HubHTTPError:
        return HubHTTPError(400, f"{self.where}: the file's content is not valid base64")

    def write(self, text: bytes) -> None:
        if self.escape:
            text, self.escape = b"\\" + text, False
        if b"\\" in text:
            if text.endswith(b"\\") and not text.endswith(b"\\\\"):
                text, self.escape = text[:-1], True
            text = text.replace(b"\\/", b"/")
            if b"\\" in text:
                raise self._bad()
        text = self.carry + text
        whole = len(text) - len(text) % 4
        self.carry = text[whole:]
        if not whole:
            return
        if self.padded:
            raise self._bad()
        try:
            data = _decode_block(text[:whole])
        except (binascii.Error, ValueError):
            raise self._bad() from None
        self.padded = text[whole - 1] == ord("=")
        self.room -= len(data)
        if self.room < 0:
            raise _over(self.limit)
        self.writer.write(data)

    def finish(self) -> StagedWriter:
        if self.carry or self.escape:
            raise self._bad()
        return self.writer
