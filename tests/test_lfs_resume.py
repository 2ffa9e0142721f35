"""A multipart LFS upload survives a restart of `w2wreg serve --lfs` (issue 14): the unmodified
huggingface_hub client, whose retry of the part it was sending meets a server started again, finishes the
upload, and the file reads back whole.

Real parts only: `w2wreg serve` in processes of its own (killed, then started again on the same port), the
client's own multipart transfer and retries; the file the client reads stops before its second part until
the server was restarted (the only way to place a restart between two parts of a loopback upload).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import pytest
from served import ServeProcess, hub_client_online

from registry.registry import Registry

TOKEN = "operator-token-0123"
PART = 1 << 20  # --lfs-part-mb 1


class StopsBeforePart2(io.BufferedReader):
    """A file the client reads whole once (to hash it), then in parts; the read of part 2 waits for `go`."""

    def __init__(self, path: Path):
        super().__init__(io.FileIO(path))
        self.hashed, self.reached, self.go = False, threading.Event(), threading.Event()

    def read(self, size: int | None = -1) -> bytes:
        if self.hashed and self.tell() >= PART and not self.go.is_set():
            self.reached.set()
            assert self.go.wait(300), "the server was not restarted"
        data = super().read(size)
        self.hashed |= not data  # the first pass ended
        return data


def test_a_multipart_upload_resumes_after_the_server_restarts(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    from huggingface_hub import HfApi, hf_hub_download

    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)  # LFS, as a team using --lfs sets
    reg = Registry.init(tmp_path / "reg").root
    blob = os.urandom(3 * PART + 12345)  # four parts
    (tmp_path / "w.bin").write_bytes(blob)
    server = ServeProcess(reg, TOKEN, "--lfs", "--lfs-part-mb", "1")
    errors: list[BaseException] = []
    with hub_client_online():
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo("op/big")
        source = StopsBeforePart2(tmp_path / "w.bin")

        def upload():
            try:
                api.upload_file(path_or_fileobj=source, path_in_repo="w.bin", repo_id="op/big")
            except BaseException as e:  # noqa: BLE001 (seen by the test below)
                errors.append(e)

        client = threading.Thread(target=upload)
        client.start()
        try:
            assert source.reached.wait(300), errors
            incoming = reg / "repos" / "incoming"
            (upload_dir,) = incoming.iterdir()
            assert [p.name for p in upload_dir.glob("part-*")] == ["part-1"]  # part 1 was received
            server.kill()
            server = ServeProcess(reg, TOKEN, "--lfs", "--lfs-part-mb", "1", port=server.port)
        finally:
            source.go.set()
            client.join(300)
        assert not errors, errors
        info = api.get_paths_info("op/big", ["w.bin"])[0]
        assert info.lfs.sha256 == hashlib.sha256(blob).hexdigest() and info.lfs.size == len(blob)
        got = hf_hub_download("op/big", "w.bin", endpoint=server.url, token=TOKEN, cache_dir=tmp_path / "c")
        assert Path(got).read_bytes() == blob
        assert not any(incoming.iterdir())  # the parts went into the object
    server.stop()


@pytest.mark.parametrize("idle", [False, True])
def test_a_multipart_upload_outlives_its_process_until_idle(tmp_path, idle):
    from registry.hubs.staging import MULTIPART_IDLE, PartedFile, clean_incoming
    from registry.hubs.store import RepoStore

    store = RepoStore(tmp_path / "repos")
    blob = os.urandom(2 * PART + 1)
    oid = hashlib.sha256(blob).hexdigest()
    first = PartedFile(store, "op/x", oid, len(blob), PART)
    etag1 = first.write_part(1, [blob[:PART]])
    if idle:
        for f in [first.folder, *first.folder.iterdir()]:
            os.utime(f, (0, os.stat(f).st_mtime - MULTIPART_IDLE - 1))
    assert clean_incoming(store) == int(idle)  # what a starting server removes
    again = PartedFile(store, "op/x", oid, len(blob), PART)  # another process
    if idle:
        assert again.done == {}
        return
    assert again.done == {1: etag1}
    etags = {1: etag1, 2: again.write_part(2, [blob[PART : 2 * PART]]), 3: again.write_part(3, [blob[2 * PART :]])}
    again.finish(etags)
    assert store.object_path(oid).read_bytes() == blob
