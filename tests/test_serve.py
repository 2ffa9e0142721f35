"""`w2wreg serve` against the real huggingface_hub client (and diffusers), over real HTTP on loopback.

One server per module: its registry starts empty; the tests push to it as a team would.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from served import LiveServer, hub_client_online
from test_registry import BASE, SMALL, as_json, run

from ingest.synthetic import Population
from registry.hubs.store import RepoStore
from registry.registry import Registry
from server.accounts import Accounts
from server.app import create_app

TOKEN = "team-token-0123"
N_MODELS = 14


@pytest.fixture(scope="module", autouse=True)
def _online():
    with hub_client_online():  # this module's hub is local
        yield


@pytest.fixture(scope="module")
def client_reg(tmp_path_factory) -> Path:
    """A user's registry: 14 LoRAs with attributes, a fitted space, a direction, an edit."""
    root = tmp_path_factory.mktemp("client")
    loras = root / "loras"
    csv_path = Population(SMALL, seed=3).write(loras, N_MODELS, formats=("diffusers",), base_model=BASE)
    reg = root / "reg"
    run(reg, "init")
    run(reg, "add", str(loras), "--attrs-csv", str(csv_path))
    run(reg, "fit", "--components", "6")
    run(reg, "direction", "fit", "beard")
    run(reg, "edit", "identity_00001", "--direction", "beard=1", "--name", "alice-bearded")
    return reg


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    reg = Registry.init(tmp_path_factory.mktemp("hub") / "reg")
    # alice writes her organizations' namespaces, where these tests push (server.access)
    accounts = Accounts(tokens={TOKEN: "alice"}, orgs={o: {"alice"} for o in ("team", "lab", "crew", "faces")})
    server = LiveServer(create_app(reg, accounts, max_upload=4 << 20))
    yield server, reg
    server.stop()


@pytest.fixture(scope="module")
def api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub[0].url, token=TOKEN)


@pytest.fixture(scope="module")
def plain(api) -> str:
    """A repo with one file, for the tests of refused writes (independent of the push tests' order)."""
    api.create_repo("team/plain", exist_ok=True)
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="notes.txt", repo_id="team/plain")
    return "team/plain"


def push(client_reg: Path, model: str, repo: str, url: str, *extra: str, code: int = 0):
    from click.testing import CliRunner

    from cli.main import cli

    r = CliRunner().invoke(
        cli, ["--registry", str(client_reg), "push", model, "--repo", repo, "--hub", url, "--json", *extra],
        env={"HF_TOKEN": TOKEN}, catch_exceptions=False,
    )  # fmt: skip
    assert r.exit_code == code, r.output
    return json.loads(r.stdout) if code == 0 else r


def test_push_is_indexed_and_pulls_back(client_reg, hub, api, tmp_path):
    server, hub_reg = hub
    out = push(client_reg, "identity_00002", "team/bob", server.url)
    assert out["hub"] == f"hf:{server.url}" and len(out["revision"]) == 40
    assert api.list_repo_files("team/bob") == [".gitattributes", "README.md", "pytorch_lora_weights.safetensors"]
    info = api.model_info("team/bob")
    assert info.sha == out["revision"]
    card = info.card_data.to_dict()
    assert card["base_model"] == BASE and card["base_model_relation"] == "adapter"
    assert card["library_name"] == "diffusers" and {"lora", "w2w"} <= set(card["tags"])
    # a push is an ingest: the hub's registry has the model, same vector, attributes from the card
    client = Registry.open(client_reg)
    m = hub_reg.get("team.bob")
    assert m.source == f"hub:serve/team/bob@{out['revision']}"
    assert np.array_equal(hub_reg.vector(m), client.vector("identity_00002"))
    assert m.attributes == client.get("identity_00002").attributes
    # pulled by another registry: the source names the commit it pulled
    other = tmp_path / "other"
    run(other, "init")
    r = CliRunner_add(other, "hub:team/bob", server.url)
    assert r["added"][0]["name"] == "bob"
    shown = as_json(other, "show", "bob")
    assert shown["source"] == f"hub:hf:{server.url}/team/bob@{out['revision']}"
    assert np.array_equal(Registry.open(other).vector("bob"), client.vector("identity_00002"))


def CliRunner_add(reg: Path, ref: str, url: str) -> dict:
    from click.testing import CliRunner

    from cli.main import cli

    r = CliRunner().invoke(cli, ["--registry", str(reg), "add", ref, "--hub", url, "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_derived_model_card_names_parent_repo_and_revision(client_reg, hub, api, tmp_path):
    server, hub_reg = hub
    parent = push(client_reg, "identity_00001", "team/alice", server.url)
    preview = tmp_path / "look.png"
    preview.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    child = push(client_reg, "alice-bearded", "team/alice-bearded", server.url, "--preview", str(preview))
    assert "previews/look.png" in api.list_repo_files("team/alice-bearded")
    w2w = api.model_info("team/alice-bearded").card_data.to_dict()["w2w"]
    (entry,) = w2w["lineage"]
    assert entry["operation"] == "edit" and entry["parent"] == "identity_00001"
    assert entry["parent_repo"] == "team/alice" and entry["parent_revision"] == parent["revision"]
    assert entry["params"]["directions"] == {"beard": 1.0}
    child_model = hub_reg.get("team.alice-bearded")
    assert child_model.kind == "edit"
    (link,) = hub_reg.catalog.lineage(child_model.id)  # the parent was pushed here too: linked
    assert link["parent"] == "team.alice" and link["operation"] == "edit"
    assert child["revision"] != parent["revision"]


def test_diffusers_loads_a_lora_from_the_server(hub, api, tiny_base, tiny_layout, base_unet, tmp_path):
    """diffusers' load_lora_weights("ns/name") with HF_ENDPOINT at the server, in a fresh process."""
    from helpers import apply_lora, random_lora, unet_out

    from w2w.formats import write_lora

    server, hub_reg = hub
    lora = random_lora(tiny_layout, seed=5, scale=0.3)
    folder = tmp_path / "lora"
    write_lora(lora, folder / "pytorch_lora_weights.safetensors", "diffusers")
    api.create_repo("team/tiny")
    api.upload_folder(repo_id="team/tiny", folder_path=folder)
    assert hub_reg.get("team.tiny").space_id != hub_reg.get("team.bob").space_id  # another layout: another space
    # pinned by a tag (issue 14): main no longer has the file, the tag does
    api.create_tag("team/tiny", tag="v1")
    api.delete_file("pytorch_lora_weights.safetensors", "team/tiny")
    out = tmp_path / "out.npy"
    script = f"""
import sys, numpy as np, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from diffusers import StableDiffusionPipeline
from helpers import unet_out
pipe = StableDiffusionPipeline.from_pretrained({str(tiny_base)!r})
pipe.load_lora_weights("team/tiny", weight_name="pytorch_lora_weights.safetensors", revision="v1")
np.save({str(out)!r}, unet_out(pipe.unet).numpy())
"""
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = unet_out(apply_lora(base_unet, lora)).numpy()
    got = np.load(out)
    assert not np.allclose(unet_out(base_unet).numpy(), expected, atol=1e-4)  # the LoRA does change the output
    # two float32 runs of the tiny UNet (PEFT's adapter vs merged weights, another process): within 7e-6 of each
    # other by rounding alone (the derivation is at test_formats' ATOL), a wrong LoRA is off by ~0.1
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_ingest_push_to_uploads_each_trained_model(hub, api, tiny_base, faces, tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    server, hub_reg = hub
    args = ["--registry", str(tmp_path / "r"), "ingest", str(faces), "--base-model", str(tiny_base), "--steps", "2",
            "-B", "5", "--push-to", "faces/", "--hub", server.url, "--json"]  # fmt: skip
    r = CliRunner().invoke(cli, args, env={"HF_TOKEN": TOKEN}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    pushed = json.loads(r.stdout)["pushed"]
    assert len(pushed) == 5 and {p["repo"] for p in pushed} == {m.id for m in api.list_models(author="faces")}
    trained = Registry.open(tmp_path / "r")
    for p in pushed:
        m = hub_reg.get(p["repo"].replace("/", "."))
        assert m.kind == "trained" and np.array_equal(hub_reg.vector(m), trained.vector(p["model"]))


def test_revision_pinning_and_history(hub, api, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    server, _ = hub
    api.create_repo("team/notes")
    first = api.upload_file(path_or_fileobj=b"one", path_in_repo="notes.txt", repo_id="team/notes").oid
    second = api.upload_file(path_or_fileobj=b"two", path_in_repo="notes.txt", repo_id="team/notes").oid
    assert first != second
    get = lambda rev: Path(  # noqa: E731
        hf_hub_download("team/notes", "notes.txt", revision=rev, endpoint=server.url, cache_dir=tmp_path / "c")
    ).read_bytes()
    assert get(first) == b"one" and get(second) == b"two" and get(None) == b"two"
    assert get(first[:10]) == b"one"  # a unique prefix names a commit too
    snap = Path(snapshot_download("team/notes", revision=first, endpoint=server.url, cache_dir=tmp_path / "s"))
    assert (snap / "notes.txt").read_bytes() == b"one"
    commits = [c.commit_id for c in api.list_repo_commits("team/notes")]
    assert commits[:2] == [second, first] and len(commits) == 3  # + the initial commit
    assert api.model_info("team/notes", revision=first).sha == first
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with pytest.raises(RevisionNotFoundError):
        api.model_info("team/notes", revision="f" * 40)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("team/nothing-here")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("team/notes", "missing.txt", endpoint=server.url, cache_dir=tmp_path / "c")
    # deleting a file is a commit too; the old revision still has it
    api.delete_file("notes.txt", "team/notes")
    assert api.list_repo_files("team/notes") == [".gitattributes"] and get(second) == b"two"


def test_list_and_search_models(hub, api, client_reg):
    server, _ = hub
    push(client_reg, "identity_00004", "lab/carol", server.url)
    assert [m.id for m in api.list_models(search="caro")] == ["lab/carol"]
    assert {m.id for m in api.list_models(author="lab")} == {"lab/carol"}
    found = list(api.list_models(search="carol", limit=5))
    assert found[0].sha == api.model_info("lab/carol").sha


def test_writes_need_a_valid_token_reads_do_not(hub, plain):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    server, hub_reg = hub
    n_models = len(hub_reg.ls())
    for token in (None, "wrong-token-xyz"):
        anon = HfApi(endpoint=server.url, token=token or False)
        with pytest.raises(HfHubHTTPError) as e:
            anon.create_repo("team/sneaky")
        assert e.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError):
            anon.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=plain)
        assert anon.list_repo_files(plain)  # reads are open
    status, _, body = server.request("POST", "/api/w2w/sample", {"n": 1})
    assert status == 401 and "token" in body["error"]
    assert len(hub_reg.ls()) == n_models


def test_private_repos_and_private_server(hub, api, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    server, hub_reg = hub
    api.create_repo("team/secret", private=True)
    api.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id="team/secret")
    anon = HfApi(endpoint=server.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anon.model_info("team/secret")
    assert "team/secret" not in {m.id for m in anon.list_models()}
    assert "team/secret" in {m.id for m in api.list_models()}
    # a --private server: nothing readable without a token
    private = LiveServer(create_app(Registry.init(tmp_path / "p"), {TOKEN: "alice"}, private=True))
    try:
        assert private.get("/api/w2w/models")[0] == 401
        assert private.request("GET", "/api/w2w/models", token=TOKEN)[0] == 200
        from huggingface_hub.errors import HfHubHTTPError

        with pytest.raises(HfHubHTTPError):
            list(HfApi(endpoint=private.url, token=False).list_models())
    finally:
        private.stop()


@pytest.mark.parametrize(
    "path",
    ["../escape.txt", "a/../../b", "/abs.txt", ".git/config", "a//b", "back\\slash", "nul\x00.txt", "x" * 1001],
)
def test_bad_paths_are_refused(hub, api, plain, path):
    server, _ = hub
    head = api.model_info(plain).sha
    line = {"key": "file", "value": {"path": path, "content": base64.b64encode(b"x").decode(), "encoding": "base64"}}
    body = json.dumps({"key": "header", "value": {"summary": "bad"}}) + "\n" + json.dumps(line) + "\n"
    status, headers, err = server.request(
        "POST", f"/api/models/{plain}/commit/main", body.encode(), token=TOKEN,
        headers={"Content-Type": "application/x-ndjson"},
    )  # fmt: skip
    assert status == 400 and "not a valid file path" in err["error"]
    assert api.model_info(plain).sha == head


@pytest.mark.parametrize(
    "body",
    [b"not json\n", b'{"key": "file", "value": []}\n', b'{"key": "header", "value": {"summary": "x"}}\n'
     b'{"key": "file", "value": {"path": "a.txt", "content": "***"}}\n', b'{"key": "lfsFile", "value": {}}\n',
     b'{"key": "file", "value": {"path": "a.txt", "content": "YQ=="}}\n'],  # the last: no header
)  # fmt: skip
def test_malformed_commits_are_400(hub, api, plain, body):
    server, _ = hub
    head = api.model_info(plain).sha
    status, _, err = server.request("POST", f"/api/models/{plain}/commit/main", body, token=TOKEN,
                                    headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
    assert status == 400 and err["error"], err
    assert api.model_info(plain).sha == head


def test_bad_repo_ids_and_traversal(hub, api):
    server, _ = hub
    for name, org in (("..", "team"), ("x", ".."), ("a/b", "team"), ("", "team"), ("", "")):
        status, _, err = server.request("POST", "/api/repos/create", {"name": name, "organization": org}, token=TOKEN)
        assert status in (400, 404) and err and "error" in err, (name, org, status)
    for path in ("/team/bob/resolve/main/..%2F..%2Fcatalog.duckdb", "/team/bob/resolve/main/../../repo.json",
                 "/..%2F..%2Fcatalog.duckdb/x/resolve/main/README.md"):  # fmt: skip
        status, _, body = server.request("GET", path)
        assert status in (400, 404), (path, status)
        assert not (isinstance(body, bytes) and body.startswith(b"DUCK"))


def test_upload_size_limit(hub, api, plain):
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as e:
        api.upload_file(path_or_fileobj=b"\0" * (5 << 20), path_in_repo="big.bin", repo_id=plain)
    assert e.value.response.status_code == 413
    assert "big.bin" not in api.list_repo_files(plain)


def test_a_file_that_is_not_a_lora_refuses_the_commit(hub, api):
    from huggingface_hub.errors import HfHubHTTPError

    server, hub_reg = hub
    api.create_repo("team/broken")
    n_models = len(hub_reg.ls())
    head = api.model_info("team/broken").sha
    with pytest.raises(HfHubHTTPError) as e:
        api.upload_file(path_or_fileobj=b"not safetensors", path_in_repo="pytorch_lora_weights.safetensors",
                        repo_id="team/broken")  # fmt: skip
    assert e.value.response.status_code == 422 and "pytorch_lora_weights.safetensors" in str(e.value)
    assert api.model_info("team/broken").sha == head and len(hub_reg.ls()) == n_models


def test_interrupted_commit_leaves_the_previous_revision(hub, api, plain):
    server, hub_reg = hub
    head = api.model_info(plain).sha
    files = api.list_repo_files(plain)
    header = json.dumps({"key": "header", "value": {"summary": "cut short"}}) + "\n"
    line = json.dumps({"key": "file", "value": {"path": "README.md", "content": "QUJD" * 5000, "encoding": "base64"}})
    body = (header + line + "\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            f"POST /api/models/{plain}/commit/main HTTP/1.1\r\nHost: x\r\n".encode()
            + f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/x-ndjson\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
    assert api.model_info(plain).sha == head and api.list_repo_files(plain) == files
    api.upload_file(path_or_fileobj=b"after", path_in_repo="after.txt", repo_id=plain)  # the repo still works
    assert api.model_info(plain).sha != head


def test_concurrent_commits_to_one_repo_are_serialized(hub, api):
    api.create_repo("team/busy")
    errors = []

    def one(i: int):
        try:
            api.upload_file(path_or_fileobj=f"{i}".encode(), path_in_repo=f"f{i}.txt", repo_id="team/busy")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(api.list_repo_files("team/busy")) == sorted(
        [".gitattributes", *(f"f{i}.txt" for i in range(8))]
    )  # no lost update
    assert len(api.list_repo_commits("team/busy")) == 9


def test_catch_up_indexes_a_head_pushed_while_indexing_was_down(hub, tmp_path, client_reg):
    """A commit that landed but was never indexed (a crash in between) is indexed at the next start."""
    server, _ = hub
    reg = Registry.init(tmp_path / "r")
    store = RepoStore(reg.paths.repos)
    store.create("team/late")
    data = (Path(client_reg) / "..").resolve()  # any LoRA file will do: take the population's
    lora = sorted((data / "loras").glob("*.safetensors"))[0].read_bytes()
    store.commit("team/late", {"pytorch_lora_weights.safetensors": store.put_object(lora)}, message="m")
    assert not reg.ls()
    late = LiveServer(create_app(reg, {TOKEN: "alice"}))
    late.stop()
    assert [m.name for m in reg.ls()] == ["team.late"]


# --- the w2w API -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_hub(hub, client_reg):
    """The hub after pushes of 10 models and a fit run by an admin (another process's CLI) meanwhile."""
    server, hub_reg = hub
    for i in range(5, N_MODELS):
        push(client_reg, f"identity_{i:05d}", f"crew/m{i}", server.url)
    space = hub_reg.get("team.bob").space_id  # the tiny-UNet LoRA pushed above has a space of its own
    run(hub_reg.root, "fit", "--components", "4", "--space", space)
    run(hub_reg.root, "direction", "fit", "beard", "--space", space)
    return server, hub_reg


def test_api_search_and_model(fitted_hub):
    server, hub_reg = fitted_hub
    status, _, r = server.get("/api/w2w/search", like="crew.m5", k=3)
    assert status == 200 and len(r["hits"]) == 3
    expected = [h.model.name for h in hub_reg.search("crew.m5", k=3).hits]
    assert [h["model"]["name"] for h in r["hits"]] == expected
    assert r["hits"][0]["model"]["repo"] == expected[0].replace(".", "/", 1)
    status, _, r = server.get("/api/w2w/search", like="crew.m5", k=20, where="beard")
    assert status == 200 and all(h["model"]["attributes"]["beard"] for h in r["hits"])
    status, _, r = server.get("/api/w2w/search", like="crew.m5", k=3, metric="w2w")
    assert status == 200 and r["metric"] == "w2w"
    alike = hub_reg.search("crew.m5", 3, metric="w2w").hits
    assert [h["model"]["name"] for h in r["hits"]] == [h.model.name for h in alike]
    assert server.get("/api/w2w/search", like="crew.m5", metric="no-such-metric")[0] == 422
    status, _, d = server.get("/api/w2w/models/crew.m5")
    assert d["model"]["repo"] == "crew/m5" and len(d["neighbours"]) == 5 and d["projection"]["subspace"]
    assert d["neighbours_metric"] == "w2w"  # a fitted space: who is alike
    assert [h["model"]["name"] for h in d["neighbours"]] == [
        h.model.name for h in hub_reg.search("crew.m5", 5, metric="w2w").hits
    ]
    assert server.get("/api/w2w/models/nobody")[0] == 404
    assert server.get("/api/w2w/search", like="crew.m5", where="no_such_attr > 1")[0] == 400
    status, _, p = server.get("/api/w2w/models/crew.m5/project", n=2)
    assert status == 200 and len(p["coefficients"]) == 2 and p["k"] == 4
    status, _, mp = server.get("/api/w2w/map")
    assert status == 200 and {"crew.m5", "team.bob"} <= {pt["name"] for pt in mp["points"]}
    status, headers, data = server.request("GET", "/api/w2w/models/crew.m5/lora")
    assert status == 200 and np.array_equal(_vector_of(data), hub_reg.vector("crew.m5"))


def _vector_of(data: bytes) -> np.ndarray:
    import tempfile

    from w2w.formats.fastread import read_vector

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "pytorch_lora_weights.safetensors"
        p.write_bytes(data)
        return read_vector(p).vector


def test_api_edit_mix_sample_register_models_with_lineage(fitted_hub):
    server, hub_reg = fitted_hub
    status, _, r = server.request("POST", "/api/w2w/edit", {"model": "crew.m6", "directions": {"beard": 1.0}},
                                  token=TOKEN)  # fmt: skip
    assert status == 200, r
    name = r["models"][0]["name"]
    assert r["details"]["scores"]["beard"]["after"] > r["details"]["scores"]["beard"]["before"]
    status, _, d = server.get(f"/api/w2w/models/{name}")
    assert d["lineage"][0]["parent"] == "crew.m6" and d["lineage"][0]["operation"] == "edit"
    assert name in {c["name"] for c in server.get("/api/w2w/models/crew.m6")[2]["children"]}
    status, _, r = server.request("POST", "/api/w2w/mix", {"expr": "lerp(crew.m7, crew.m8, 0.5)", "name": "half"},
                                  token=TOKEN)  # fmt: skip
    assert status == 200 and r["details"]["parents"] == ["crew.m7", "crew.m8"]
    w = 0.5 * hub_reg.vector("crew.m7").astype(np.float64) + 0.5 * hub_reg.vector("crew.m8")
    # evaluated on coefficients (the hub is fitted, k = 4): each parent's residual w - recon(c) and the result's
    # recon(c) + residual, in float32: k-term dot products (k u each), * std, + mean, the lerp and the final
    # rounding: within (2k + 6) u max|w| of the float64 lerp (u = 2^-24)
    np.testing.assert_allclose(hub_reg.vector("half"), w, rtol=0, atol=(2 * 4 + 6) * 2**-24 * float(np.abs(w).max()))
    status, _, r = server.request("POST", "/api/w2w/mix", {"expr": "crew.m7 +* 2"}, token=TOKEN)
    assert status == 400 and "column" in r["error"]
    status, _, r = server.request("POST", "/api/w2w/mix", {"expr": "0.5*nobody + 0.5*crew.m8"}, token=TOKEN)
    assert status in (400, 404) and "nobody" in r["error"]
    status, _, r = server.request("POST", "/api/w2w/sample", {"n": 2, "seed": 1, "prefix": "web"}, token=TOKEN)
    assert status == 200 and [m["name"] for m in r["models"]] == ["web-s1-0", "web-s1-1"], r
    assert hub_reg.get("web-s1-0").kind == "sample"


def test_openapi_document(fitted_hub):
    server, _ = fitted_hub
    status, _, doc = server.get("/api/w2w/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/api/w2w/search", "/api/w2w/models/{ref}", "/api/w2w/edit", "/api/w2w/mix", "/api/w2w/sample",
            "/api/w2w/map"} <= set(doc["paths"])  # fmt: skip
    assert not any(p.startswith("/api/models") for p in doc["paths"])  # the Hub protocol is not this API's
    status, _, page = server.request("GET", "/")
    assert status == 200 and b"w2wreg hub" in page


def test_the_serve_command_runs_a_hub_and_stops_cleanly(tmp_path):
    import signal
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# team\nalice alice-token-123\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--registry", str(tmp_path / "hub"), "--port", str(port),
         "--tokens-file", str(tokens)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/w2w/spaces", timeout=2) as r:
                    assert json.load(r) == []
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/whoami-v2",
                                     headers={"Authorization": "Bearer alice-token-123"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.load(r)["name"] == "alice"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    # uvicorn shuts down cleanly, then re-raises the signal so the exit status tells how it ended
    assert proc.returncode in (0, -signal.SIGTERM) and "shutdown complete" in err, err
    assert (tmp_path / "hub" / "catalog.duckdb").exists()  # serving an empty folder makes the registry


def test_a_bad_tokens_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "tokens.txt"
    bad.write_text("alice short\n")
    r = run(tmp_path / "hub", "serve", "--tokens-file", str(bad), code=1)
    assert r.output.strip() == f"error: {bad}:1: a token must have at least 8 characters"


def test_verify_checks_the_served_repos(tmp_path):
    reg = Registry.init(tmp_path / "r")
    store = RepoStore(reg.paths.repos)
    store.create("team/doc")
    entry = store.put_object(b"hello")
    store.commit("team/doc", {"notes.txt": entry}, message="m")
    assert as_json(reg.root, "verify")["ok"]
    store.object_path(entry.sha256).write_bytes(b"hellO")  # bit rot
    out = json.loads(run(reg.root, "verify", "--json", code=3).stdout)
    assert not out["ok"]
    assert any("team/doc" in f["what"] and "notes.txt" in f["what"] for f in out["findings"])
