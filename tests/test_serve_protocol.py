"""`w2wreg serve` speaks the model-repo protocol of the Hub's clients (issue 14): bare repo names, branches,
tags and refs everywhere a revision goes, paths-info, copies, delete / move / settings, auth-check,
super-squash, whoami, request ids and the client's own exceptions, each through server.access's rule.

Real clients only: the unmodified huggingface_hub HfApi and the `hf` CLI (a subprocess) against a live server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from served import LiveServer, ServeProcess, hub_client_online

from registry.registry import Registry
from server.accounts import Accounts
from server.app import create_app

ALICE, BOB = "alice-token-0123", "bob-token-0123"


@pytest.fixture(scope="module", autouse=True)
def _online():
    with hub_client_online():  # this module's hub is local
        yield


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    reg = Registry.init(tmp_path_factory.mktemp("hub") / "reg")
    accounts = Accounts(tokens={ALICE: "alice", BOB: "bob"}, orgs={"team": {"alice"}, "lab": {"bob"}})
    server = LiveServer(create_app(reg, accounts))
    yield server, reg
    server.stop()


def hf(server, token):
    from huggingface_hub import HfApi

    return HfApi(endpoint=server.url, token=token or False)


@pytest.fixture(scope="module")
def alice(hub):
    return hf(hub[0], ALICE)


@pytest.fixture(scope="module")
def bob(hub):
    return hf(hub[0], BOB)


def test_bare_repo_name_goes_under_the_token_user_and_whoami_has_orgs(alice):
    url = alice.create_repo("bare")
    assert url.repo_id == "alice/bare"
    assert alice.create_repo("bare", exist_ok=True).repo_id == "alice/bare"
    alice.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="alice/bare")
    assert alice.list_repo_files("alice/bare") == [".gitattributes", "a.txt"]  # the Hub's, on create
    me = alice.whoami()
    assert me["name"] == "alice" and me["fullname"] == "alice" and [o["name"] for o in me["orgs"]] == ["team"]


def test_branches_tags_and_refs_everywhere_a_revision_goes(alice, tmp_path):
    from huggingface_hub import hf_hub_download

    repo = "team/refs"
    alice.create_repo(repo)
    v1 = alice.upload_file(path_or_fileobj=b"v1", path_in_repo="notes.txt", repo_id=repo).oid
    alice.create_branch(repo, branch="dev")
    alice.create_branch(repo, branch="dev", exist_ok=True)
    alice.create_tag(repo, tag="v1.0", tag_message="first")
    dev = alice.upload_file(path_or_fileobj=b"dev", path_in_repo="notes.txt", repo_id=repo, revision="dev").oid
    alice.upload_file(path_or_fileobj=b"new", path_in_repo="extra/x.txt", repo_id=repo, revision="dev")
    alice.create_branch(repo, branch="feature/x", revision="v1.0")
    refs = alice.list_repo_refs(repo)
    branches = {b.name: b.target_commit for b in refs.branches}
    assert branches["main"] == v1 and branches["feature/x"] == v1 and branches["dev"] != dev  # dev moved on
    assert {t.name: t.ref for t in refs.tags} == {"v1.0": "refs/tags/v1.0"}
    assert refs.tags[0].target_commit == v1 and refs.converts == []
    assert alice.list_repo_refs(repo, include_pull_requests=True).pull_requests == []

    def read(revision: str) -> bytes:
        return Path(hf_hub_download(repo, "notes.txt", revision=revision, endpoint=alice.endpoint,
                                    token=ALICE, cache_dir=tmp_path / "cache")).read_bytes()  # fmt: skip

    assert read("dev") == b"dev" and read("v1.0") == b"v1" and read("refs/heads/main") == b"v1"
    assert read("refs/tags/v1.0") == b"v1" and read("feature/x") == b"v1" and read(v1) == b"v1"
    assert alice.model_info(repo, revision="v1.0").sha == v1
    assert alice.model_info(repo, revision="refs/heads/dev").sha == branches["dev"]
    assert sorted(alice.list_repo_files(repo, revision="dev")) == [".gitattributes", "extra/x.txt", "notes.txt"]
    assert "extra/x.txt" not in alice.list_repo_files(repo)
    assert alice.list_repo_files(repo, revision="refs/heads/dev") == alice.list_repo_files(repo, revision="dev")
    assert [c.commit_id for c in alice.list_repo_commits(repo, revision="refs/tags/v1.0")][0] == v1
    assert [f.path for f in alice.list_repo_tree(repo, path_in_repo="extra", revision="refs/heads/dev")] == [
        "extra/x.txt"
    ]
    assert [f.path for f in alice.list_repo_tree(repo, path_in_repo="extra", revision="dev")] == ["extra/x.txt"]
    assert len(alice.list_repo_commits(repo, revision="dev")) == len(alice.list_repo_commits(repo)) + 2
    alice.delete_tag(repo, tag="v1.0")
    alice.delete_branch(repo, branch="feature/x")
    refs = alice.list_repo_refs(repo)
    assert {b.name for b in refs.branches} == {"main", "dev"} and refs.tags == []


def test_revision_errors_are_the_clients_own(alice, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = "team/errs"
    alice.create_repo(repo)
    alice.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    for call in (
        lambda: alice.model_info(repo, revision="nope"),
        lambda: alice.list_repo_files(repo, revision="nope"),
        lambda: alice.list_repo_commits(repo, revision="nope"),
        lambda: alice.upload_file(path_or_fileobj=b"x", path_in_repo="y.txt", repo_id=repo, revision="nope"),
        lambda: alice.delete_branch(repo, branch="nope"),
        lambda: alice.create_tag(repo, tag="t", revision="nope"),
    ):
        with pytest.raises(RevisionNotFoundError):
            call()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.txt", endpoint=alice.endpoint, token=ALICE, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        alice.list_repo_refs("team/none")
    alice.create_tag(repo, tag="t1")
    with pytest.raises(HfHubHTTPError) as e:
        alice.create_tag(repo, tag="t1")
    assert e.value.response.status_code == 409
    alice.create_tag(repo, tag="t1", exist_ok=True)
    with pytest.raises(RevisionNotFoundError):  # commits go to a branch, not a tag
        alice.upload_file(path_or_fileobj=b"x", path_in_repo="y.txt", repo_id=repo, revision="t1")
    for bad in ("a..b", "-x", ".hidden", "x.lock", "refs/heads/x", "a b", "a\nb"):
        with pytest.raises(HfHubHTTPError) as e:
            alice.create_branch(repo, branch=bad)
        # a newline inside: no route matches it (the router's patterns stop at one), so a plain 404
        assert e.value.response.status_code == (404 if "\n" in bad else 400), bad
    with pytest.raises(HfHubHTTPError) as e:
        alice.delete_branch(repo, branch="main")
    assert e.value.response.status_code == 400


def test_paths_info_copy_and_folder_deletes(alice):
    from huggingface_hub import CommitOperationCopy, CommitOperationDelete, RepoFile, RepoFolder

    repo = "team/paths"
    alice.create_repo(repo)
    alice.upload_folder(repo_id=repo, folder_path=_folder(alice, {"a/b.txt": b"b", "a/c.txt": b"c", "top.txt": b"t"}))
    info = alice.get_paths_info(repo, ["top.txt", "a", "missing"])
    assert [(type(i), i.path) for i in info] == [(RepoFile, "top.txt"), (RepoFolder, "a")]
    assert info[0].size == 1
    alice.create_commit(repo, [CommitOperationCopy("top.txt", "copy/top.txt")], commit_message="copy")
    assert alice.get_paths_info(repo, "copy/top.txt")[0].blob_id == info[0].blob_id
    alice.create_commit(repo, [CommitOperationDelete("a")], commit_message="a folder, no trailing slash")
    assert sorted(alice.list_repo_files(repo)) == [".gitattributes", "copy/top.txt", "top.txt"]


def test_paths_info_and_tree_expand_give_the_last_commit_and_a_scan_status(alice):
    """expand=True: each entry's last commit is the newest that changed it (a folder: any file under it), as
    `git log -1 -- PATH`; files say "unscanned" (this hub scans nothing), which the client reads as not safe."""
    repo = "team/expand"
    alice.create_repo(repo)

    def up(data: bytes, path: str, message: str) -> str:
        return alice.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo, commit_message=message).oid

    first = up(b"1", "a.txt", "a one")
    second = up(b"c", "b/c.txt", "b/c")
    third = up(b"2", "a.txt", "a two")
    up(b"1", "a.txt", "a back to one")  # the same content as `first`: still a change of a.txt
    last = up(b"d", "b/d.txt", "b/d")
    info = {i.path: i for i in alice.get_paths_info(repo, ["a.txt", "b", "b/c.txt", ".gitattributes"], expand=True)}
    assert info["a.txt"].last_commit.oid == [c.commit_id for c in alice.list_repo_commits(repo)][1]
    assert info["a.txt"].last_commit.title == "a back to one" and info["a.txt"].last_commit.oid not in (first, third)
    assert info["b"].last_commit.oid == last and info["b/c.txt"].last_commit.oid == second
    assert info[".gitattributes"].last_commit.oid == alice.list_repo_commits(repo)[-1].commit_id  # made with it
    assert info["a.txt"].security.status == "unscanned" and info["a.txt"].security.safe is False
    assert alice.get_paths_info(repo, ["a.txt"])[0].last_commit is None  # only when asked for
    tree = {e.path: e for e in alice.list_repo_tree(repo, expand=True, recursive=True)}
    assert tree["b"].last_commit.oid == last and tree["b/c.txt"].last_commit.oid == second
    assert tree["a.txt"].last_commit == info["a.txt"].last_commit and tree["a.txt"].security.status == "unscanned"
    older = {e.path: e for e in alice.list_repo_tree(repo, expand=True, revision=third)}
    assert older["a.txt"].last_commit.oid == third and "b/d.txt" not in older
    # expanded, a tree comes 50 entries a page (as the Hub's): the client follows the pages
    many = alice.upload_folder(repo_id=repo, folder_path=_folder(alice, {f"m/{i:03d}": b"m" for i in range(120)}))
    listed = list(alice.list_repo_tree(repo, path_in_repo="m", expand=True))
    assert len(listed) == 120 and {e.last_commit.oid for e in listed} == {many.oid}


def test_deleting_a_missing_file_or_folder_is_the_clients_entry_not_found(alice):
    """As on the Hub: an error (404 EntryNotFound, which the client raises as EntryNotFoundError, adding its
    hint on file and folder paths), not an empty commit."""
    from huggingface_hub import CommitOperationDelete
    from huggingface_hub.errors import EntryNotFoundError

    repo = "team/missing"
    alice.create_repo(repo)
    alice.upload_file(path_or_fileobj=b"x", path_in_repo="dir/x.txt", repo_id=repo)
    before = len(alice.list_repo_commits(repo))
    with pytest.raises(EntryNotFoundError) as e:
        alice.delete_folder("nope", repo)
    assert "'nope/'" in str(e.value)
    with pytest.raises(EntryNotFoundError) as e:
        alice.delete_file("nope.txt", repo)
    assert "differentiate file and folder paths" in str(e.value)  # the client's own hint
    with pytest.raises(EntryNotFoundError):  # one missing path fails the whole commit
        ops = [CommitOperationDelete("dir/x.txt"), CommitOperationDelete("other/", is_folder=True)]
        alice.create_commit(repo, ops, commit_message="two deletes")
    assert len(alice.list_repo_commits(repo)) == before and "dir/x.txt" in alice.list_repo_files(repo)
    alice.delete_folder("dir", repo)
    assert alice.list_repo_files(repo) == [".gitattributes"]


def _folder(api, files: dict[str, bytes]) -> Path:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="w2w-up-"))
    for p, data in files.items():
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(data)
    return root


def test_delete_move_settings_auth_check_follow_the_access_rule(hub, alice, bob):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    server = hub[0]
    alice.create_repo("team/moving", private=True)
    alice.upload_file(path_or_fileobj=b"m", path_in_repo="m.txt", repo_id="team/moving")
    alice.create_branch("team/moving", branch="dev")
    alice.auth_check("team/moving")
    alice.auth_check("team/moving", write=True)
    for call in (
        lambda: bob.auth_check("team/moving"),
        lambda: bob.list_repo_refs("team/moving"),  # a branch of a private repo is as private as the repo
        lambda: bob.model_info("team/moving", revision="dev"),
        lambda: bob.delete_repo("team/moving"),
        lambda: bob.move_repo("team/moving", "lab/stolen"),
        lambda: hf(server, None).list_repo_refs("team/moving"),
    ):
        with pytest.raises(RepositoryNotFoundError):
            call()
    with pytest.raises(HfHubHTTPError) as e:  # a move needs write on the target's namespace too
        alice.move_repo("team/moving", "lab/moving")
    assert e.value.response.status_code == 403
    alice.update_repo_settings("team/moving", private=False)
    bob.auth_check("team/moving")
    with pytest.raises(HfHubHTTPError) as e:
        bob.auth_check("team/moving", write=True)
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        bob.update_repo_settings("team/moving", private=True)
    assert e.value.response.status_code == 403
    alice.move_repo("team/moving", "alice/moved")
    assert alice.model_info("alice/moved").private is False
    assert {b.name for b in alice.list_repo_refs("alice/moved").branches} == {"main", "dev"}
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("team/moving")
    alice.create_repo("team/taken")
    with pytest.raises(HfHubHTTPError) as e:
        alice.move_repo("alice/moved", "team/taken")
    assert e.value.response.status_code == 409
    alice.delete_repo("alice/moved")
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("alice/moved")
    alice.delete_repo("alice/moved", missing_ok=True)
    alice.create_repo("alice/moved")  # the name is free again, and the new repo starts empty
    assert alice.list_repo_files("alice/moved") == [".gitattributes"]


def test_super_squash_history(alice):
    repo = "team/squash"
    alice.create_repo(repo)
    for i in range(3):
        alice.upload_file(path_or_fileobj=str(i).encode(), path_in_repo=f"{i}.txt", repo_id=repo)
    alice.create_tag(repo, tag="before")
    alice.super_squash_history(repo, commit_message="squashed")
    commits = alice.list_repo_commits(repo)
    assert [c.title for c in commits] == ["squashed"]
    assert sorted(alice.list_repo_files(repo)) == [".gitattributes", "0.txt", "1.txt", "2.txt"]
    assert len(alice.list_repo_commits(repo, revision="before")) == 4  # the tag keeps the old history


def test_request_id_on_every_response(hub):
    server = hub[0]
    for path in ("/api/models", "/api/models/team/none", "/api/w2w/models"):
        status, headers, _ = server.request("GET", path)
        assert len({k.lower(): v for k, v in headers.items()}.get("x-request-id", "")) == 32, path
    _, headers, _ = server.request("GET", "/api/models", headers={"X-Request-Id": "trace-1"})
    assert {k.lower(): v for k, v in headers.items()}["x-request-id"] == "trace-1"


def test_hf_cli_upload_and_download_a_branch(hub, tmp_path):
    server = hub[0]
    folder = _folder(None, {"w.txt": b"on dev"})
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_TOKEN": ALICE, "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "NO_COLOR": "1"}  # fmt: skip
    env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN")  # set for this module's in-process clients; the CLI uses HF_TOKEN
    hf_cli = Path(sys.executable).parent / "hf"

    def run(*args: str) -> str:
        r = subprocess.run([str(hf_cli), *args], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr + r.stdout
        return r.stdout

    run("repos", "create", "team/cli")
    run("upload", "team/cli", str(folder), ".", "--revision", "dev", "--commit-message", "to dev")
    run("download", "team/cli", "w.txt", "--revision", "dev", "--local-dir", str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "w.txt").read_bytes() == b"on dev"
    run("repos", "tag", "create", "team/cli", "v1", "--revision", "dev")
    assert "v1" in run("repos", "tag", "list", "team/cli")
    run("download", "team/cli", "w.txt", "--revision", "v1", "--local-dir", str(tmp_path / "dl2"))
    assert (tmp_path / "dl2" / "w.txt").read_bytes() == b"on dev"
    run("repos", "branch", "create", "team/cli", "scratch", "--revision", "v1")
    run("repos", "delete-files", "team/cli", "w.txt", "--revision", "scratch")
    run("repos", "branch", "delete", "team/cli", "scratch")
    run("repos", "settings", "team/cli", "--private")
    run("repos", "move", "team/cli", "alice/cli")
    run("repos", "duplicate", "alice/cli", "alice/cli-copy")
    mine = {r["id"]: r for r in json.loads(run("repos", "ls", "--json"))}
    assert mine["alice/cli"]["visibility"] == mine["alice/cli-copy"]["visibility"] == "private"  # as the source
    run("repos", "cp", "hf://alice/cli/.gitattributes", "hf://alice/cli-copy/copied.txt")  # one repo to another
    from huggingface_hub import HfApi

    api = HfApi(endpoint=server.url, token=ALICE)
    assert api.model_info("alice/cli").private and "w.txt" not in api.list_repo_files("alice/cli")  # main untouched
    assert {b.name for b in api.list_repo_refs("alice/cli").branches} == {"main", "dev"}
    run("repos", "delete", "alice/cli", "--yes")
    assert not api.repo_exists("alice/cli")


def test_gitignore_at_preupload_and_the_hubs_file_names(alice, tmp_path):
    from huggingface_hub import CommitOperationAdd, hf_hub_download

    repo = "team/names"
    alice.create_repo(repo)
    alice.upload_file(path_or_fileobj=b"*.log\nbuild/\n", path_in_repo=".gitignore", repo_id=repo)
    folder = _folder(alice, {"keep.txt": b"k", "debug.log": b"l", "build/out.bin": b"o", "sub/x.log": b"l"})
    alice.upload_folder(repo_id=repo, folder_path=folder)  # the branch's .gitignore decides: shouldIgnore
    assert sorted(alice.list_repo_files(repo)) == [".gitattributes", ".gitignore", "keep.txt"]
    # 'a:b.txt' would be a drive on Windows: the client itself refuses to save it, so 'ab:c.txt'
    odd = {"what?.txt": b"q", "ab:c.txt": b"c", "x,y.txt": b"k", "100%.txt": b"p", "dir?/f%20g.txt": b"s"}
    alice.create_commit(repo, [CommitOperationAdd(p, d) for p, d in odd.items()], commit_message="odd names")
    for name, data in odd.items():
        got = hf_hub_download(repo, name, endpoint=alice.endpoint, token=ALICE, cache_dir=tmp_path / "c")
        assert Path(got).read_bytes() == data, name
        assert alice.get_paths_info(repo, name)[0].size == len(data)
    assert [f.path for f in alice.list_repo_tree(repo, path_in_repo="dir?")] == ["dir?/f%20g.txt"]


def test_list_models_filters(hub, alice, bob):
    from huggingface_hub import CommitOperationAdd

    for name, tags in (("lora-a", ["lora", "w2w"]), ("lora-b", ["lora"]), ("plain-c", ["other"])):
        card = "---\nlibrary_name: diffusers\nbase_model: base/x\ntags:\n" + "".join(f"- {t}\n" for t in tags) + "---\n"
        bob.create_repo(f"lab/{name}")
        bob.create_commit(f"lab/{name}", [CommitOperationAdd("README.md", card.encode())], commit_message="card")
    ids = lambda **kw: [m.id for m in alice.list_models(author="lab", **kw)]  # noqa: E731
    assert sorted(ids(filter="lora")) == ["lab/lora-a", "lab/lora-b"]
    assert ids(filter=["lora", "w2w"]) == ["lab/lora-a"]
    assert sorted(ids(filter="base_model:base/x")) == ["lab/lora-a", "lab/lora-b", "lab/plain-c"]
    assert ids(search="plain") == ["lab/plain-c"] and ids(filter="diffusers", search="lora-b") == ["lab/lora-b"]
    assert ids(sort="lastModified") == ["lab/plain-c", "lab/lora-b", "lab/lora-a"]
    assert ids(sort="created_at", limit=1) == ["lab/plain-c"]
    short, full = alice.list_models(author="lab", limit=1), alice.list_models(author="lab", limit=1, full=True)
    assert next(short).siblings is None and [s.rfilename for s in next(full).siblings] == [
        ".gitattributes",
        "README.md",
    ]


def test_listings_page_through_link_headers_and_expand(hub, alice, monkeypatch):
    from huggingface_hub import CommitOperationAdd

    from server import hf_common

    server, _ = hub
    for i in range(3):
        alice.create_repo(f"alice/paged-{i}")
    repo = "alice/paged-0"
    for i in range(4):
        alice.upload_file(path_or_fileobj=f"{i}".encode(), path_in_repo=f"f{i}.txt", repo_id=repo)
    alice.create_commit(repo, [CommitOperationAdd("w.bin", b"\0" * (10 << 20))], commit_message="big")  # an LFS file
    whole = {
        "models": sorted(m.id for m in alice.list_models(search="paged")),
        "tree": [f.path for f in alice.list_repo_tree(repo)],
        "commits": [c.commit_id for c in alice.list_repo_commits(repo)],
    }
    monkeypatch.setattr(hf_common, "PAGE", 2)  # the client follows the Link header from page to page
    assert (
        sorted(m.id for m in alice.list_models(search="paged"))
        == whole["models"]
        == [f"alice/paged-{i}" for i in range(3)]
    )
    assert [f.path for f in alice.list_repo_tree(repo)] == whole["tree"] and len(whole["tree"]) == 6
    assert [c.commit_id for c in alice.list_repo_commits(repo)] == whole["commits"] and len(whole["commits"]) == 6
    status, headers, out = server.request("GET", f"/api/models/{repo}/commits/main", token=ALICE)
    assert len(out) == 2 and 'cursor=2>; rel="next"' in headers["link"]
    assert server.request("GET", f"/api/models/{repo}/commits/main?cursor=x", token=ALICE)[0] == 400
    monkeypatch.undo()
    info = alice.model_info(repo, expand=["sha", "private"])
    assert info.sha == whole["commits"][0] and info.private is False and info.tags is None and info.siblings is None
    listed = next(iter(alice.list_models(search="paged-0", expand=["cardData", "siblings"])))
    assert listed.siblings and listed.downloads is None
    files = {f.rfilename: f for f in alice.model_info(repo, files_metadata=True).siblings}
    assert files["w.bin"].lfs.size == 10 << 20 and files["f0.txt"].lfs is None


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> list[bytes]:
    from test_registry import BASE, SMALL

    from ingest.synthetic import Population

    out = tmp_path_factory.mktemp("loras")
    Population(SMALL, seed=11).write(out, 5, formats=("diffusers",), base_model=BASE)
    return [p.read_bytes() for p in sorted(out.glob("*.safetensors"))]


LORA = "pytorch_lora_weights.safetensors"


def _card(age: float) -> bytes:
    return f"---\nw2w:\n  attributes:\n    age: {age}\n---\n# a face\n".encode()


def _visible(server, token, where: str | None = None) -> set[str]:
    status, _, out = server.request("GET", "/api/w2w/models" + (f"?where={where}" if where else ""), token=token)
    assert status == 200, out
    return {m["name"] for m in out["models"]}


def test_indexing_follows_the_repo(hub, alice, bob, loras):
    from huggingface_hub import CommitOperationAdd

    server, reg = hub
    add = lambda repo, files, **kw: alice.create_commit(  # noqa: E731
        repo, [CommitOperationAdd(p, d) for p, d in files.items()], commit_message="push", **kw
    )
    alice.create_repo("team/face")
    add("team/face", {LORA: loras[0], "README.md": _card(30)})
    assert reg.get("team.face").attributes == {"age": 30.0}
    assert "team.face" not in _visible(server, None, "age%20%3E%2050")
    # a card-only commit, later than the LoRA: the model takes its attributes
    add("team/face", {"README.md": _card(55)})
    assert reg.get("team.face").attributes == {"age": 55.0}
    assert "team.face" in _visible(server, None, "age%20%3E%2050")
    # a LoRA on another branch is stored, not indexed
    n = len(reg.ls())
    alice.create_branch("team/face", branch="dev")
    add("team/face", {LORA: loras[1]}, revision="dev")
    assert len(reg.ls()) == n
    # a move: the model follows (its source names the new repo, same commit)
    before = reg.get("team.face").source
    alice.move_repo("team/face", "alice/face")
    assert reg.get("team.face").source == before.replace("team/face", "alice/face")
    assert "team.face" in _visible(server, None)
    # a private repo deleted: its model stays (a vector for lineage), marked, and as hidden as the repo was
    alice.create_repo("team/hush", private=True)
    add("team/hush", {LORA: loras[2]})
    assert "team.hush" in _visible(server, ALICE) and "team.hush" not in _visible(server, BOB)
    alice.delete_repo("team/hush")
    assert reg.get("team.hush").source.startswith("hub:serve-deleted-private/team/hush@")
    assert "team.hush" in _visible(server, ALICE) and "team.hush" not in _visible(server, BOB)
    alice.create_repo("team/hush")  # the same name again, public: the old model does not come with it
    assert "team.hush" not in _visible(server, BOB) and "team.hush" not in _visible(server, None)
    # a public repo deleted: its model stays readable, marked as such
    alice.delete_repo("alice/face")
    assert reg.get("team.face").source.startswith("hub:serve-deleted/alice/face@")
    assert "team.face" in _visible(server, BOB)


def test_hffilesystem_and_snapshot_download_at_a_revision(hub, alice, tmp_path):
    from huggingface_hub import HfFileSystem, snapshot_download

    repo = "team/fs"
    alice.create_repo(repo)
    alice.upload_folder(repo_id=repo, folder_path=_folder(alice, {"a/b.txt": b"bb", "c.txt": b"c"}))
    alice.create_tag(repo, tag="v1")
    alice.delete_file("c.txt", repo)
    fs = HfFileSystem(endpoint=alice.endpoint, token=ALICE)
    assert sorted(fs.ls(f"{repo}@v1", detail=False)) == [f"{repo}@v1/{p}" for p in (".gitattributes", "a", "c.txt")]
    assert fs.cat(f"{repo}@v1/c.txt") == b"c" and fs.cat(f"{repo}/a/b.txt") == b"bb"
    assert not fs.exists(f"{repo}/c.txt") and fs.info(f"{repo}/a")["type"] == "directory"
    with fs.open(f"{repo}/new.txt", "wb") as f:  # a write through the file system is a commit
        f.write(b"new")
    assert alice.list_repo_files(repo) == [".gitattributes", "a/b.txt", "new.txt"]
    got = Path(snapshot_download(repo, revision="v1", endpoint=alice.endpoint, token=ALICE, cache_dir=tmp_path))
    assert (got / "c.txt").read_bytes() == b"c" and (got / "a" / "b.txt").read_bytes() == b"bb"


PART = 256 << 10


@pytest.fixture
def lfs_hub(tmp_path, monkeypatch):
    """A server that answers 'lfs' at preupload, and a client without Xet (HF_HUB_DISABLE_XET=1)."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    reg = Registry.init(tmp_path / "lfs-reg")
    app = create_app(reg, Accounts(tokens={ALICE: "alice", BOB: "bob"}), lfs=True, max_upload=1 << 20)
    app.state.w2w.lfs_part_size = PART  # objects over it go up in parts (the multipart transfer)
    server = LiveServer(app)
    yield server, reg
    server.stop()


def test_lfs_batch_upload_streams_verifies_and_indexes(lfs_hub, loras, tmp_path):
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy, hf_hub_download

    server, reg = lfs_hub
    api = hf(server, ALICE)
    api.create_repo("alice/big")
    blob = bytes(range(256)) * 1000  # binary (NUL bytes): the Hub sends it through LFS
    api.create_commit("alice/big", [CommitOperationAdd("data.bin", blob), CommitOperationAdd(LORA, loras[3]),
                                    CommitOperationAdd("notes.txt", b"text")], commit_message="lfs")  # fmt: skip
    info = {f.path: f for f in api.get_paths_info("alice/big", ["data.bin", LORA, "notes.txt"])}
    assert info["data.bin"].lfs.sha256 == hashlib.sha256(blob).hexdigest() and info["data.bin"].lfs.size == len(blob)
    assert info[LORA].lfs is not None and info["notes.txt"].lfs is None  # *.safetensors: LFS by .gitattributes
    assert reg.get("alice.big").source.startswith("hub:serve/alice/big@")  # a LoRA through LFS is indexed
    got = hf_hub_download("alice/big", "data.bin", endpoint=server.url, token=ALICE, cache_dir=tmp_path / "c")
    assert Path(got).read_bytes() == blob
    api.create_commit("alice/big", [CommitOperationCopy("data.bin", "copy.bin")], commit_message="copy an LFS file")
    assert api.get_paths_info("alice/big", "copy.bin")[0].lfs.sha256 == info["data.bin"].lfs.sha256
    # the batch API: writers only; an upload link is signed for one object and size
    oid, size = hashlib.sha256(b"\0new").hexdigest(), 4
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": size}]}
    status, _, _ = server.request("POST", "/alice/big.git/info/lfs/objects/batch", batch, token=BOB)
    assert status == 403
    status, _, out = server.request("POST", "/alice/big.git/info/lfs/objects/batch", batch, token=ALICE)
    href = out["objects"][0]["actions"]["upload"]["href"].removeprefix(server.url)
    assert server.request("PUT", href.replace(f"size={size}", "size=5"), b"\0new!")[0] == 401  # tampered
    assert server.request("PUT", href, b"\0old")[0] == 400  # not the announced content: not kept
    assert not (reg.paths.repos / "objects" / oid[:2] / oid).exists()
    assert server.request("PUT", href, b"\0new")[0] == 200
    status, _, out = server.request("POST", "/alice/big.git/info/lfs/objects/batch", batch, token=ALICE)
    assert "actions" not in out["objects"][0]  # stored: nothing to upload
    big = {"operation": "upload", "objects": [{"oid": oid, "size": 2 << 20}]}
    status, _, out = server.request("POST", "/alice/big.git/info/lfs/objects/batch", big, token=ALICE)
    assert out["objects"][0]["error"]["code"] == 413
    # an lfsFile naming an object not uploaded to this repo, even one stored for another: refused
    bob = hf(server, BOB)
    bob.create_repo("bob/claim")
    for missing in ("0" * 64, info["data.bin"].lfs.sha256):
        line = {"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": missing, "size": len(blob)}}
        body = json.dumps({"key": "header", "value": {"summary": "x"}}) + "\n" + json.dumps(line) + "\n"
        status, _, out = server.request("POST", "/api/models/bob/claim/commit/main", body.encode(), token=BOB,
                                        headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
        assert status == 400 and "was not uploaded to bob/claim" in out["error"], out
    theirs = {"operation": "upload", "objects": [{"oid": info["data.bin"].lfs.sha256, "size": len(blob)}]}
    out = server.request("POST", "/bob/claim.git/info/lfs/objects/batch", theirs, token=BOB)[2]
    assert "upload" in out["objects"][0]["actions"]  # no hint that another repo holds it


def _batch(server, repo: str, operation: str, oid: str, size: int, token=ALICE, transfers=("basic", "multipart")):
    body = {"operation": operation, "transfers": list(transfers), "objects": [{"oid": oid, "size": size}]}
    status, _, out = server.request("POST", f"/{repo}.git/info/lfs/objects/batch", body, token=token)
    return status, out["objects"][0] if status == 200 else out


def test_lfs_multipart_upload_checks_every_part_and_the_whole(lfs_hub, tmp_path):
    from huggingface_hub import hf_hub_download

    server, reg = lfs_hub
    api = hf(server, ALICE)
    api.create_repo("alice/parts")
    blob = os.urandom(3 * PART - 1000)  # three parts, the last one short
    api.upload_file(path_or_fileobj=blob, path_in_repo="w.bin", repo_id="alice/parts")  # the client's multipart
    info = api.get_paths_info("alice/parts", ["w.bin"])[0]
    assert info.lfs.sha256 == hashlib.sha256(blob).hexdigest() and info.lfs.size == len(blob)
    got = hf_hub_download("alice/parts", "w.bin", endpoint=server.url, token=ALICE, cache_dir=tmp_path / "c")
    assert Path(got).read_bytes() == blob
    # what the batch API answers: a chunk size and a link per part, the upload href being the completion
    other = os.urandom(2 * PART + 1)
    oid = hashlib.sha256(other).hexdigest()
    _, obj = _batch(server, "alice/parts", "upload", oid, len(other))
    header, done = obj["actions"]["upload"]["header"], obj["actions"]["upload"]["href"].removeprefix(server.url)
    assert header["chunk_size"] == str(PART) and sorted(k for k in header if k.isdigit()) == ["1", "2", "3"]
    basic = _batch(server, "alice/parts", "upload", oid, len(other), transfers=["basic"])[1]
    assert "header" not in basic["actions"]["upload"]  # a client that offers no multipart gets one PUT
    part = {n: header[str(n)].removeprefix(server.url) for n in (1, 2, 3)}
    pieces = {1: other[:PART], 2: other[PART : 2 * PART], 3: other[2 * PART :]}
    assert server.request("PUT", part[1], pieces[1] + b"x")[0] == 400  # longer than the part
    assert server.request("PUT", part[3], b"\0" * len(pieces[3]))[0] == 200  # wrong content: seen at the end
    etags = {n: server.request("PUT", part[n], pieces[n])[1]["etag"] for n in (2, 1)}  # out of order
    parts = [{"partNumber": n, "etag": etags.get(n, '"x"')} for n in (1, 2, 3)]
    assert server.request("POST", done, {"oid": oid, "parts": parts})[0] == 400  # part 3's etag is not the one given
    assert not reg.paths.repos.joinpath("objects", oid[:2], oid).exists()
    _, obj = _batch(server, "alice/parts", "upload", oid, len(other))  # a new upload, from the start
    part = {n: obj["actions"]["upload"]["header"][str(n)].removeprefix(server.url) for n in (1, 2, 3)}
    done = obj["actions"]["upload"]["href"].removeprefix(server.url)
    etags = {n: server.request("PUT", part[n], b"\1" * len(pieces[n]) if n == 3 else pieces[n])[1]["etag"]
             for n in (1, 2, 3)}  # fmt: skip
    status, _, out = server.request("POST", done, {"oid": oid, "parts": [{"partNumber": n, "etag": e}
                                                                         for n, e in etags.items()]})  # fmt: skip
    assert status == 400 and "are not" in out["error"], out  # the whole is not the announced sha256
    assert not reg.paths.repos.joinpath("objects", oid[:2], oid).exists()
    assert not any((reg.paths.repos / "incoming").iterdir())  # the parts are gone too
    assert server.request("PUT", part[1], pieces[1])[0] == 200  # a new upload
    assert server.request("PUT", part[1].replace("part=1", "part=2"), pieces[2])[0] == 401  # links are per part


def test_lfs_download_through_the_batch_api_and_ranges(lfs_hub):
    server, reg = lfs_hub
    api = hf(server, ALICE)
    api.create_repo("alice/dl", private=True)
    blob = os.urandom(100_000)
    api.upload_file(path_or_fileobj=blob, path_in_repo="d.bin", repo_id="alice/dl")
    oid = hashlib.sha256(blob).hexdigest()
    status, obj = _batch(server, "alice/dl", "download", oid, len(blob))
    href = obj["actions"]["download"]["href"].removeprefix(server.url)
    status, headers, got = server.request("GET", href)  # a signed link: no token needed
    assert status == 200 and got == blob and headers["content-length"] == str(len(blob))
    assert server.request("GET", href.replace("expires=", "expires=1"))[0] == 401
    assert _batch(server, "alice/dl", "download", oid, len(blob), token=BOB)[0] == 404  # not a reader: no repo
    bob = hf(server, BOB)
    bob.create_repo("bob/other")
    assert _batch(server, "bob/other", "download", oid, len(blob), token=BOB)[1]["error"]["code"] == 404
    # plain resolve GETs of LFS files take ranges (the client resumes a download so)
    status, headers, got = server.request("GET", "/alice/dl/resolve/main/d.bin", token=ALICE,
                                          headers={"Range": "bytes=10-19"})  # fmt: skip
    assert status == 206 and got == blob[10:20] and headers["content-range"] == f"bytes 10-19/{len(blob)}"


def test_stored_files_are_read_from_the_page_cache_or_in_a_thread(tmp_path):
    """What a download reads (server.hf_common._CachedReads): the same bytes whether the pages are cached (read
    in the event loop) or not (a worker thread), from any offset to the end."""
    import anyio

    from server.hf_common import _CachedReads

    data = os.urandom(3 * (1 << 20) + 123)
    (tmp_path / "f").write_bytes(data)

    async def read_from(start: int, cached: bool) -> bytes:
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            r = _CachedReads(fd)
            r.nowait &= cached
            await r.seek(start)
            out = []
            while chunk := await r.read(1 << 20):
                out.append(chunk)
            return b"".join(out)
        finally:
            os.close(fd)

    for cached in (True, False):
        for start in (0, 1000, len(data) - 1, len(data)):
            assert anyio.run(read_from, start, cached) == data[start:], (cached, start)


def test_xet_is_refused_with_what_to_do(tmp_path):
    """huggingface_hub 2.4 with hf_xet (its default) sends a file preupload calls "lfs" through Xet and never
    falls back to LFS: against `serve --lfs` its upload fails on the Xet token (hf_xet shows the status and
    the URL); HF_HUB_DISABLE_XET=1 is what a team sets (test_lfs_*), or it serves without --lfs."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils._runtime import is_xet_available

    reg = Registry.init(tmp_path / "r")
    server = LiveServer(create_app(reg, {ALICE: "alice"}, lfs=True))
    try:
        api = hf(server, ALICE)
        api.create_repo("alice/x")
        status, _, out = server.request("GET", "/api/models/alice/x/xet-write-token/main", token=ALICE)
        assert status == 501 and "HF_HUB_DISABLE_XET=1" in out["error"]
        if is_xet_available():  # the client as installed by default
            with pytest.raises((HfHubHTTPError, ConnectionError)) as e:
                api.upload_file(path_or_fileobj=b"\0" * 100, path_in_repo="a.bin", repo_id="alice/x")
            assert "501" in str(e.value) and "xet-write-token" in str(e.value)
    finally:
        server.stop()


def test_a_big_upload_of_the_default_client_streams_to_disk(tmp_path):
    """huggingface_hub with hf_xet (its default) sends every file here base64-encoded in the commit body (it
    would send "lfs" files to Xet, so preupload answers "regular"): the server parses the body as it arrives,
    decoding the content straight to disk, so its memory does not grow with the file (it held ~6.6x the file
    before). The bound: what the server holds by design is a few 1 MiB batches of the body and one 1 MiB line
    (server.body_stream, server.commit_body), well under 32 MiB; the file is 48 MiB and its body 64 MiB."""
    from huggingface_hub import HfApi, hf_hub_download

    server = ServeProcess(tmp_path / "reg", ALICE)
    try:
        api = HfApi(endpoint=server.url, token=ALICE)
        api.create_repo("team/big")
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom(48 << 20))
        server.reset_peak()
        idle = server.rss()
        api.upload_file(path_or_fileobj=str(src), path_in_repo="big.bin", repo_id="team/big")
        grew = server.peak_rss() - idle
        assert grew < 32 << 20, f"the server's memory grew by {grew >> 20} MiB for a 48 MiB file"
        info = api.get_paths_info("team/big", ["big.bin"])[0]  # kept in LFS, as the Hub keeps files >= 10 MB
        assert info.lfs.sha256 == hashlib.sha256(src.read_bytes()).hexdigest() and info.size == 48 << 20
        server.reset_peak()
        idle = server.rss()
        got = hf_hub_download("team/big", "big.bin", endpoint=server.url, token=ALICE, cache_dir=tmp_path / "c")
        assert Path(got).read_bytes() == src.read_bytes()
        grew = server.peak_rss() - idle
        assert grew < 32 << 20, f"the server's memory grew by {grew >> 20} MiB to send a 48 MiB file"
    finally:
        server.stop()


def test_the_upload_limit_is_on_decoded_bytes_and_a_refused_commit_leaves_nothing(tmp_path):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    reg = Registry.init(tmp_path / "r")
    server = LiveServer(create_app(reg, {ALICE: "alice"}, max_upload=1 << 20))
    objects = reg.paths.repos / "objects"

    def stored() -> set[str]:
        return {p.name for p in objects.rglob("*") if p.is_file()}

    try:
        api = hf(server, ALICE)
        api.create_repo("alice/lim")
        near = os.urandom(900_000)  # its body (base64: 1.2 MB) is over the 1 MiB limit, the file is not
        api.upload_file(path_or_fileobj=near, path_in_repo="near.bin", repo_id="alice/lim")
        kept = stored()
        two = [CommitOperationAdd("a.bin", os.urandom(600_000)), CommitOperationAdd("b.bin", os.urandom(600_000))]
        with pytest.raises(HfHubHTTPError) as e:  # each passes preupload; together they are over
            api.create_commit("alice/lim", two, commit_message="too much")
        assert e.value.response.status_code == 413 and "--max-upload-mb" in str(e.value), e.value
        assert stored() == kept and not any((reg.paths.repos / "incoming").iterdir())  # nothing half-written
        assert api.list_repo_files("alice/lim") == [".gitattributes", "near.bin"]
        with pytest.raises(HfHubHTTPError) as e:  # one file over the limit: refused at preupload
            api.upload_file(path_or_fileobj=os.urandom((1 << 20) + 1), path_in_repo="x.bin", repo_id="alice/lim")
        assert e.value.response.status_code == 413
        # a client that hangs up in the middle of a file's content: nothing kept, the server goes on
        line = json.dumps({"key": "file", "value": {"content": base64.b64encode(os.urandom(600_000)).decode(),
                                                    "path": "cut.bin"}})  # fmt: skip
        body = (json.dumps({"key": "header", "value": {"summary": "cut"}}) + "\n" + line).encode()
        incoming = reg.paths.repos / "incoming"

        def wait_until(done) -> None:
            deadline = time.monotonic() + 20
            while not done() and time.monotonic() < deadline:
                time.sleep(0.02)

        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /api/models/alice/lim/commit/main HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + ALICE.encode() + b"\r\nContent-Type: application/x-ndjson\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])  # fmt: skip
            wait_until(lambda: any(incoming.iterdir()))  # the commit has begun: its staging is there
            assert any(incoming.iterdir())
        wait_until(lambda: not any(incoming.iterdir()))  # hung up: the staging goes
        assert stored() == kept and not any((reg.paths.repos / "incoming").iterdir())
        assert api.list_repo_files("alice/lim") == [".gitattributes", "near.bin"]
    finally:
        server.stop()


def test_a_card_changed_while_the_server_was_down_is_caught_up_at_start(tmp_path, loras):
    from registry.hubs.store import RepoStore

    reg = Registry.init(tmp_path / "r")
    store = RepoStore(reg.paths.repos)
    store.create("team/late")
    store.commit("team/late", store.put_objects({LORA: loras[4], "README.md": _card(20)}), message="lora")
    LiveServer(create_app(reg, {ALICE: "alice"})).stop()
    assert reg.get("team.late").attributes == {"age": 20.0}
    store.commit("team/late", store.put_objects({"README.md": _card(70)}), message="card, server down")
    n = len(reg.ls())
    LiveServer(create_app(reg, {ALICE: "alice"})).stop()
    assert reg.get("team.late").attributes == {"age": 70.0} and len(reg.ls()) == n  # updated, not re-added


def test_a_delete_or_move_cut_off_from_its_index_update_is_finished_at_start(tmp_path, loras):
    """The server writes what a delete or move will make the index do before the store does it
    (server.indexing.intend); a server that died between the two finishes it at its next start."""
    from registry.hubs.store import RepoStore
    from server import indexing

    reg = Registry.init(tmp_path / "r")
    store = RepoStore(reg.paths.repos)
    for repo, lora in (("team/gone", loras[0]), ("team/old", loras[1]), ("team/kept", loras[2])):
        store.create(repo)
        store.commit(repo, store.put_objects({LORA: lora}), message="lora")
    LiveServer(create_app(reg, {ALICE: "alice"})).stop()  # indexed at start
    # what a server killed right after the store's change leaves: the intent, the store changed, the index not
    indexing.intend(store, {"op": "delete", "repo": "team/gone", "private": False})
    store.delete("team/gone")
    indexing.intend(store, {"op": "move", "src": "team/old", "dst": "team/new"})
    store.move("team/old", "team/new")
    indexing.intend(store, {"op": "delete", "repo": "team/kept", "private": False})  # died before the store did it
    assert reg.get("team.gone").source.startswith("hub:serve/team/gone@")  # stale
    LiveServer(create_app(reg, {ALICE: "alice"})).stop()
    assert reg.get("team.gone").source.startswith("hub:serve-deleted/team/gone@")
    assert reg.get("team.old").source.startswith("hub:serve/team/new@")
    assert reg.get("team.kept").source.startswith("hub:serve/team/kept@") and store.exists("team/kept")
    assert not list((reg.paths.repos / "intents").iterdir())


def test_index_branches_indexes_a_lora_pushed_to_another_branch(tmp_path, loras):
    from huggingface_hub import CommitOperationAdd

    reg = Registry.init(tmp_path / "r")
    server = LiveServer(create_app(reg, {ALICE: "alice"}, index_branches=True))
    try:
        api = hf(server, ALICE)
        api.create_repo("alice/br")
        api.create_branch("alice/br", branch="dev")
        api.create_commit("alice/br", [CommitOperationAdd(LORA, loras[0])], commit_message="dev", revision="dev")
        assert reg.get("alice.br").source.startswith("hub:serve/alice/br@")
    finally:
        server.stop()


def test_what_is_not_supported_gets_the_clients_own_clear_error(hub, alice, tmp_path):
    """The README's list of what this hub does not speak, each through the real client: datasets, Spaces and
    kernels, pull requests and discussions, gated repos, and git over HTTP."""
    from huggingface_hub import CommitOperationAdd, hf_hub_download
    from huggingface_hub.errors import BadRequestError, HfHubHTTPError, RepositoryNotFoundError

    server = hub[0]
    only_models = "this hub keeps model repos only"
    for kind in ("dataset", "space"):
        with pytest.raises(BadRequestError, match=f"{only_models}, not '{kind}' repos"):
            alice.create_repo(f"alice/{kind}-x", repo_type=kind, **({"space_sdk": "gradio"} if kind == "space" else {}))
    for call in (
        lambda: alice.dataset_info("team/data"),
        lambda: alice.space_info("team/app"),
        lambda: hf_hub_download("team/data", "x.csv", repo_type="dataset", endpoint=server.url, cache_dir=tmp_path),
        lambda: list(alice.list_repo_files("team/data", repo_type="dataset")),
    ):
        with pytest.raises(RepositoryNotFoundError, match=only_models):
            call()
    with pytest.raises((RepositoryNotFoundError, HfHubHTTPError), match=only_models):
        list(alice.list_datasets(limit=3))

    alice.create_repo("alice/nopr")
    with pytest.raises(BadRequestError, match="this hub does not take pull requests"):
        alice.create_commit("alice/nopr", [CommitOperationAdd("a.txt", b"a")], commit_message="pr", create_pr=True)
    for call in (
        lambda: list(alice.get_repo_discussions("alice/nopr")),
        lambda: alice.create_discussion("alice/nopr", title="hello"),
        lambda: alice.create_pull_request("alice/nopr", title="hello"),
    ):
        with pytest.raises(HfHubHTTPError, match="no pull requests or discussions") as e:
            call()
        assert e.value.response.status_code == 404
    with pytest.raises(BadRequestError, match="this hub has no gated repos"):
        alice.update_repo_settings("alice/nopr", gated="auto")
    with pytest.raises(HfHubHTTPError, match="no catalogue of tags"):
        alice.get_model_tags()
    assert list(alice.list_repo_likers("alice/nopr")) == []  # no likes here (`likes` is 0 everywhere)
    with pytest.raises(RepositoryNotFoundError):
        list(alice.list_repo_likers("alice/none"))

    git = shutil.which("git")
    if git:  # git's smart HTTP: not spoken here (a clear failure, nothing cloned)
        r = subprocess.run([git, "clone", f"{server.url}/alice/nopr", str(tmp_path / "clone")], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})  # fmt: skip
        assert r.returncode != 0 and "this hub does not speak git over HTTP" in r.stderr, r.stderr
        assert not (tmp_path / "clone" / ".git").exists()


def test_duplicate_repo_copies_main_under_the_access_rule(hub, alice, bob, loras):
    """`duplicate_repo` (HfApi): the source's main in one commit of a new repo, as private as asked (or as the
    source), indexed as a push; read on the source and write on the target's namespace needed."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    server, reg = hub
    bob.create_repo("lab/dup-src")
    bob.create_commit("lab/dup-src", [CommitOperationAdd(LORA, loras[4]), CommitOperationAdd("a/b.txt", b"b")],
                      commit_message="src")  # fmt: skip
    url = alice.duplicate_repo("lab/dup-src", to_id="alice/dup", private=True)
    assert url.repo_id == "alice/dup" and not url.files_copy_pending
    assert sorted(alice.list_repo_files("alice/dup")) == sorted(bob.list_repo_files("lab/dup-src"))
    assert alice.model_info("alice/dup").private and not bob.repo_exists("alice/dup")
    assert alice.list_repo_commits("alice/dup")[0].title == "Duplicate from lab/dup-src"
    # the same weights as lab/dup-src's model: the registry keeps one model per weights, the repo stands
    assert reg.get("lab.dup-src").source.startswith("hub:serve/lab/dup-src@")
    assert alice.duplicate_repo("lab/dup-src").repo_id == "alice/dup-src"  # by default: the caller's, same name
    assert not alice.model_info("alice/dup-src").private  # as the source
    with pytest.raises(HfHubHTTPError) as e:
        alice.duplicate_repo("lab/dup-src", to_id="alice/dup")
    assert e.value.response.status_code == 409
    assert alice.duplicate_repo("lab/dup-src", to_id="alice/dup", exist_ok=True).repo_id == "alice/dup"
    with pytest.raises(HfHubHTTPError) as e:  # not her namespace
        alice.duplicate_repo("lab/dup-src", to_id="lab/by-alice")
    assert e.value.response.status_code == 403
    with pytest.raises(RepositoryNotFoundError):  # a private repo bob may not read is as missing as none
        bob.duplicate_repo("alice/dup", to_id="bob/stolen")
    assert not alice.repo_exists("bob/stolen")


def test_list_lfs_files_and_why_they_are_not_deleted_from_history(lfs_hub):
    """`list_lfs_files`: every LFS object of the history (all branches), where it came in; writers only.
    `permanently_delete_lfs_files` is refused with what to do instead."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import BadRequestError, HfHubHTTPError

    server, _ = lfs_hub
    alice, bob = hf(server, ALICE), hf(server, BOB)
    alice.create_repo("alice/store")
    one, two = bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 50  # binary: LFS
    alice.create_commit("alice/store", [CommitOperationAdd("w/one.bin", one)], commit_message="one")
    alice.create_branch("alice/store", branch="dev")
    alice.create_commit("alice/store", [CommitOperationAdd("two.bin", two)], commit_message="two", revision="dev")
    alice.delete_file("w/one.bin", "alice/store")  # gone from main's head, not from its history
    files = list(alice.list_lfs_files("alice/store"))
    assert [(f.filename, f.size, f.ref) for f in files] == [
        ("w/one.bin", len(one), "refs/heads/main"),
        ("two.bin", len(two), "refs/heads/dev"),
    ]
    assert files[0].file_oid == hashlib.sha256(one).hexdigest() and files[0].pushed_at.year >= 2024
    with pytest.raises(HfHubHTTPError) as e:
        list(bob.list_lfs_files("alice/store"))
    assert e.value.response.status_code == 403
    with pytest.raises(BadRequestError, match="does not delete LFS objects from a repo's history"):
        alice.permanently_delete_lfs_files("alice/store", files[:1])
    assert alice.hf_hub_download("alice/store", "two.bin", revision="dev") and len(files) == 2


def test_list_user_repos_of_a_user_and_of_an_organization(hub, alice, bob):
    """`list_user_repos` (`hf repos ls`): the caller's own repos, or an organization's for its members, with
    their visibility and storage (the head's bytes)."""
    from huggingface_hub.errors import HfHubHTTPError

    alice.create_repo("alice/ls-a", private=True)
    alice.upload_file(path_or_fileobj=b"x" * 100, path_in_repo="x.bin", repo_id="alice/ls-a")
    mine = {r.id: r for r in alice.list_user_repos()}
    assert "alice/ls-a" in mine and all(i.startswith("alice/") for i in mine)
    a = mine["alice/ls-a"]
    assert a.type == "model" and a.visibility == "private" and a.storage == 100 + len(alice_gitattributes(alice))
    assert abs(sum(r.storage_percent for r in mine.values()) - 100) < 1e-6 and a.updated_at.year >= 2024
    alice.create_repo("team/ls-t")
    team = list(alice.list_user_repos(namespace="team"))
    assert "team/ls-t" in {r.id for r in team} and all(r.id.startswith("team/") for r in team)
    with pytest.raises(HfHubHTTPError) as e:  # bob is not of team
        list(bob.list_user_repos(namespace="team"))
    assert e.value.response.status_code == 403
    assert "alice/ls-a" not in {r.id for r in bob.list_user_repos()}


def alice_gitattributes(api) -> bytes:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download("alice/ls-a", ".gitattributes", endpoint=api.endpoint, token=ALICE)).read_bytes()
