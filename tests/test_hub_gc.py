"""`w2wreg hub gc` (issue 14): what no branch or tag names any more is removed from the repos of `w2wreg serve`
(deleted repos, squashed history, deleted branches, what interrupted work left), every revision still
reads, and a commit in flight is safe.

Real parts only: a live server on loopback, the unmodified huggingface_hub client, raw HTTP for a commit
held mid-body, the real store on disk.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import threading
import time
from pathlib import Path

import pytest
from served import LiveServer, hub_client_online
from test_registry import run

from registry.hubs.gc import Removed, collect, parse_duration
from registry.hubs.store import RepoStore
from registry.registry import Registry
from server.app import create_app
from w2w.errors import HubError

TOKEN = "operator-token-0123"


def content(tag: str, size: int = 50_000) -> bytes:
    """Distinct bytes per tag (sha256 blocks: no two tags share an object)."""
    seed = hashlib.sha256(tag.encode()).digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1))[:size]


class Hub:
    def __init__(self, root):
        self.reg = Registry.init(root / "hub")
        self.server = LiveServer(create_app(self.reg, {TOKEN: "op"}))
        self.store = RepoStore(self.reg.paths.repos)

    def api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.server.url, token=TOKEN)

    def upload(self, repo: str, path: str, data: bytes, revision: str | None = None) -> str:
        return self.api().upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo, revision=revision).oid

    def has(self, data: bytes) -> bool:
        return self.store.object_path(hashlib.sha256(data).hexdigest()).exists()


@pytest.fixture
def hub(tmp_path):
    with hub_client_online():
        h = Hub(tmp_path)
        yield h
        h.server.stop()


def all_revisions_read(hub: Hub) -> int:
    """Download every file of every branch and tag of every repo with the client; the number of files read."""
    from huggingface_hub import hf_hub_download

    api, n = hub.api(), 0
    for repo in hub.store.list_repos():
        refs = api.list_repo_refs(repo)
        for ref in [*refs.branches, *refs.tags]:
            for f in api.list_repo_files(repo, revision=ref.target_commit):
                want = hub.store.read(hub.store.resolve(repo, ref.target_commit).files[f])
                path = hf_hub_download(repo, f, revision=ref.target_commit, endpoint=hub.server.url, token=TOKEN,
                                       cache_dir=hub.reg.root.parent / "cache")  # fmt: skip
                assert Path(path).read_bytes() == want, (repo, ref, f)
                n += 1
    return n


def test_gc_frees_what_no_revision_names_and_every_revision_still_reads(hub):
    api = hub.api()
    kept, old, tagged, gone, squashed, branch_only = (
        content(t) for t in ("kept", "old", "tagged", "gone", "sq", "dev")
    )
    api.create_repo("op/keep")
    hub.upload("op/keep", "tagged.bin", tagged)
    api.create_tag("op/keep", tag="v1")
    hub.upload("op/keep", "tagged.bin", kept)  # the tag still names the first content
    api.create_repo("op/gone")
    hub.upload("op/gone", "gone.bin", gone)
    api.delete_repo("op/gone")
    api.create_repo("op/squash")
    hub.upload("op/squash", "f.bin", squashed)
    hub.upload("op/squash", "f.bin", old)
    api.super_squash_history("op/squash")  # squashed: no revision names the first f.bin
    api.create_branch("op/keep", branch="dev")
    hub.upload("op/keep", "dev.bin", branch_only, revision="dev")
    api.delete_branch("op/keep", branch="dev")
    # what a server killed mid-commit leaves: its incoming folder (a process that no longer runs)
    dead = hub.store.root / "incoming" / "999999999-dead"
    dead.mkdir(parents=True)
    (dead / "0").write_bytes(b"x" * 1000)
    n_read = all_revisions_read(hub)

    # everything is seconds old: kept (unreachable commits stay readable by oid, with their files), but for
    # what a dead process left; the deleted repo's file is the one unreferenced object
    young = collect(hub.store, grace=3600)
    assert (young.objects.count, young.commits.count, young.leftovers.count) == (0, 0, 1)
    assert young.young == Removed(1, len(gone))
    garbage = [gone, squashed, branch_only]
    dry = run(hub.reg.root, "hub", "gc", "--grace", "0", "--dry-run", "--json")
    report = json.loads(dry.stdout)
    assert report["objects"] == {"count": 3, "bytes": sum(map(len, garbage))} and report["dry_run"]
    assert report["commits"]["count"] == 4  # the squashed three (initial commit too), the deleted branch's one
    assert all(map(hub.has, garbage))  # a dry run removes nothing

    report = json.loads(run(hub.reg.root, "hub", "gc", "--grace", "0", "--json").stdout)
    assert report["objects"] == {"count": 3, "bytes": sum(map(len, garbage))} and report["commits"]["count"] == 4
    assert report["bytes_freed"] == report["objects"]["bytes"] + report["commits"]["bytes"]
    assert not any(map(hub.has, garbage)) and all(map(hub.has, [kept, old, tagged]))
    assert hub.store.check() == [] and all_revisions_read(hub) == n_read
    assert "ok" in run(hub.reg.root, "verify").stdout
    again = collect(hub.store, grace=0)
    assert again.bytes_freed == 0 and again.objects.count == 0
    # temp files: an interrupted upload's (hours old) goes; one being written now stays, even with --grace 0
    shard = hub.store.object_path(hashlib.sha256(kept).hexdigest()).parent
    for name, age in ((".upload-old", 2 * 3600), (".upload-now", 0)):
        (shard / name).write_bytes(b"x" * 10)
        os.utime(shard / name, (time.time() - age, time.time() - age))
    assert collect(hub.store, grace=0).leftovers == Removed(1, 10)
    assert [p.name for p in shard.glob(".upload-*")] == [".upload-now"]
    # and the repos take commits as before
    hub.upload("op/squash", "f.bin", squashed)
    assert api.hf_hub_download("op/squash", "f.bin") and hub.has(squashed)


def test_a_commit_in_flight_is_safe(hub):
    """A commit whose body is still arriving while the collector runs keeps its content, even content the
    collector removes as unreferenced meanwhile; the sweep waits for a commit that holds its repo."""
    api = hub.api()
    reused = content("reused")
    api.create_repo("op/old")
    hub.upload("op/old", "r.bin", reused)
    api.delete_repo("op/old")  # reused is now unreferenced
    api.create_repo("op/new")

    # the server hands the body on in batches of >= 1 MiB (the rest waits for more): 3.2 MB make at least two
    # batches, so the lines before the second pad (ending at 1.1 MB) are read whole while the body is held
    pad, pad2 = content("pad", 800_000), content("pad2", 1_500_000)

    def line(path: str, data: bytes) -> str:
        return json.dumps({"key": "file", "value": {"content": base64.b64encode(data).decode(), "path": path,
                                                    "encoding": "base64"}}) + "\n"  # fmt: skip

    header = json.dumps({"key": "header", "value": {"summary": "slow"}}) + "\n"
    first = (header + line("r.bin", reused) + line("pad.bin", pad) + line("pad2.bin", pad2)).encode()
    release, answer = threading.Event(), {}

    def body():
        yield first
        release.wait(120)
        yield b""  # the end of the body comes only once the collector ran

    def send():
        conn = http.client.HTTPConnection("127.0.0.1", hub.server.port, timeout=60)
        conn.request("POST", "/api/models/op/new/commit/main", body=body(), encode_chunked=True,
                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"})  # fmt: skip
        resp = conn.getresponse()
        answer["status"], answer["body"] = resp.status, resp.read()

    sender = threading.Thread(target=send)
    sender.start()
    incoming = hub.store.root / "incoming"
    deadline = time.monotonic() + 120  # a machine under load is slow
    while not any(f.is_file() and f.stat().st_size == len(pad) for f in incoming.rglob("*")):  # r.bin's read
        assert time.monotonic() < deadline, "the commit's content was not staged"
        time.sleep(0.02)
    report = collect(hub.store, grace=0)  # the commit is still receiving: it holds no lock
    assert report.objects.count == 1 and not hub.has(reused)  # the stored copy went ...
    assert report.leftovers.count == 0  # ... the staged one of a live process did not
    release.set()
    sender.join(120)
    assert answer["status"] == 200, answer
    assert hub.has(reused) and Path(api.hf_hub_download("op/new", "r.bin")).read_bytes() == reused

    # the sweep waits while a repo is being written (its lock held, as by a commit between objects and ref)
    done = threading.Event()
    with hub.store.lock("op/new"):
        threading.Thread(target=lambda: (collect(hub.store, grace=0), done.set())).start()
        assert not done.wait(0.5)
    assert done.wait(30)
    assert hub.has(reused) and hub.store.check() == []


def test_durations_and_bad_commit_records(hub, tmp_path):
    assert [parse_duration(t) for t in ("0", "90", "30s", "15m", "1h", "2d")] == [0, 90, 30, 900, 3600, 172800]
    with pytest.raises(HubError, match="not a duration"):
        parse_duration("soon")
    api = hub.api()
    api.create_repo("op/bad")
    hub.upload("op/bad", "a.bin", content("a"))
    api.create_repo("op/other")
    hub.upload("op/other", "b.bin", content("b"))
    api.delete_repo("op/other")
    head = hub.store.head("op/bad")
    (hub.store.root / "repos" / "op" / "bad" / "commits" / f"{head}.json").write_text("{not json")
    result = run(hub.reg.root, "hub", "gc", "--grace", "0", code=1)
    assert "cannot be read" in result.stderr and "nothing was removed" in result.stderr
    assert hub.has(content("b"))  # unreferenced, but a damaged history keeps everything
    os.remove(hub.store.root / "repos" / "op" / "bad" / "commits" / f"{head}.json")
