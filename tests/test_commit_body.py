"""server.commit_body: the commit's NDJSON parsed as it arrives, a long line's base64 content streamed into the
staging (registry.hubs.staging), whatever the batch boundaries; bad content and bodies over the limit refused
with nothing left behind. SMALL_LINE is made tiny here so that short test lines take the streamed path."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from registry.hubs.staging import Staging, clean_incoming
from registry.hubs.store import RepoStore, git_blob_oid
from server import commit_body
from server.commit_body import content_start, parse_commit
from server.errors import HubHTTPError

HEADER = json.dumps({"key": "header", "value": {"summary": "s"}})


def file_line(path: str, data: bytes, **extra) -> str:
    return json.dumps({"key": "file", "value": {"content": base64.b64encode(data).decode(), "path": path,
                                                "encoding": "base64", **extra}})  # fmt: skip


def parse(store: RepoStore, body: bytes, batch: int, limit: int = 1 << 30):
    with Staging(store) as staging:
        ops = parse_commit((body[i : i + batch] for i in range(0, len(body), batch)), staging, limit)
        got = {p: staging.read(e) for p, e in ops.added.items()}
    return ops, got


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(commit_body, "SMALL_LINE", 64)
    return RepoStore(tmp_path / "repos")


@pytest.mark.parametrize("batch", [1, 3, 7, 64, 1 << 20])
def test_contents_stream_into_the_staging_whatever_the_batches(store, batch):
    files = {"a.bin": bytes(range(256)) * 3, "b.txt": b"x", "c/empty": b"", "d.bin": b"\0" * 1001}
    lines = [HEADER, *(file_line(p, d) for p, d in files.items())]
    # the value first, path before content, and JSON's optional escape of '/' inside the base64
    lines.append(json.dumps({"value": {"path": "e.bin", "content": base64.b64encode(b"\xff" * 300).decode()},
                             "key": "file"}).replace("/", "\\/"))  # fmt: skip
    files["e.bin"] = b"\xff" * 300
    lines.append(json.dumps({"key": "deletedFolder", "value": {"path": "old/"}}))
    ops, got = parse(store, ("\n".join(lines)).encode(), batch)  # no newline after the last line
    assert got == files and ops.deleted_folders == ["old"] and ops.header == {"summary": "s"}
    for p, d in files.items():  # the Hub's ids: sha256, and the git blob id of what is not LFS
        assert ops.added[p].sha256 == hashlib.sha256(d).hexdigest() and ops.added[p].oid == git_blob_oid(d)
    assert ops.decoded == sum(map(len, files.values()))


def test_a_file_of_10_mb_and_more_is_an_lfs_entry(store, monkeypatch):
    monkeypatch.setattr(commit_body, "LFS_SIZE", 500)
    ops, got = parse(store, (HEADER + "\n" + file_line("big.bin", b"\1" * 500) + "\n").encode(), 100)
    assert ops.added["big.bin"].lfs and got["big.bin"] == b"\1" * 500


@pytest.mark.parametrize(
    "content, why",
    [
        ("QUJD" * 40 + "=" + "QUJD" * 4, "not valid base64"),  # padding inside
        ("QQ==" + "QUJD" * 40, "not valid base64"),  # data after the padding
        ("QUJD" * 40 + "QUJ", "not valid base64"),  # not whole quads
        ("QUJD" * 40 + "\\n" + "QUJD", "not valid base64"),  # an escape base64 cannot hold
        ("QUJD" * 40 + "Q!JD", "not valid base64"),
    ],
)
def test_bad_content_is_400_and_leaves_nothing(store, content, why):
    line = '{"key": "file", "value": {"content": "' + content + '", "path": "x.bin"}}'
    with pytest.raises(HubHTTPError) as e:
        parse(store, f"{HEADER}\n{line}\n".encode(), 5)
    assert e.value.status == 400 and why in str(e.value)
    assert not list((store.root / "incoming").iterdir()) and not (store.root / "objects").exists()


def test_over_the_limit_is_413_on_the_decoded_size(store):
    body = f"{HEADER}\n{file_line('a', b'1' * 100)}\n{file_line('b', b'2' * 100)}\n".encode()
    assert parse(store, body, 9, limit=200)[0].decoded == 200  # the body is 4/3 of that and more: taken
    for limit in (199, 150, 99):
        with pytest.raises(HubHTTPError) as e:
            parse(store, body, 9, limit=limit)
        assert e.value.status == 413 and "--max-upload-mb" in str(e.value)
    assert not list((store.root / "incoming").iterdir())


def test_a_long_line_must_be_long_because_of_its_content(store):
    long_summary = json.dumps({"key": "header", "value": {"summary": "s" * 100}})
    for body in (long_summary, file_line("x" * 100, b"1")):
        with pytest.raises(HubHTTPError) as e:
            parse(store, body.encode(), 10)
        assert e.value.status == 413 and "not because of a file's base64 'content'" in str(e.value)
    with pytest.raises(HubHTTPError, match="only a file's content may be long"):
        parse(store, json.dumps({"key": "deletedFile", "value": {"content": "QUJD" * 30, "path": "a"}}).encode(), 10)


def test_content_start_skips_strings_with_find():
    line = json.dumps({"key": "file", "value": {"path": 'a\\"b"', "x": [1, {"content": "no"}], "content": "QUJD"}})
    assert line[content_start(line.encode()) :].startswith('QUJD"')
    head = b'{"key": "file", "value": {"content": "'
    assert content_start(head + b"QUJD") == len(head)
    assert content_start(b'{"content": "QUJD') is None  # not inside value
    assert content_start(b'{"value": {"content": 5') is None


def test_published_objects_and_what_a_dead_process_left(store, tmp_path):
    with Staging(store) as staging:
        entries = [staging.add(b"one"), staging.add(b"two"), staging.add(b"one")]
        staging.publish()  # (RepoStore.commit does this for its entries)
    assert [store.object_path(e.sha256).read_bytes() for e in entries] == [b"one", b"two", b"one"]
    assert not list((store.root / "incoming").iterdir())
    (store.root / "incoming" / "999999999-dead").mkdir()  # no such process
    (store.root / "incoming" / "1-alive").mkdir()  # init: always running
    assert clean_incoming(store) == 1 and [p.name for p in (store.root / "incoming").iterdir()] == ["1-alive"]
