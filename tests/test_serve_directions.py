"""Attribute directions on `w2wreg serve` say nothing of private models to those who may not read them
(issue 14): the list, the preview's sliders, an edit and a mix use a direction fitted over the models the
caller may read, so a caller's answers stay the same when a private model is added and the operator fits
the direction again.

Real parts only: a live server on loopback, the unmodified huggingface_hub client pushing the models,
the registry's own fit.
"""

from __future__ import annotations

import numpy as np
import pytest
from served import LiveServer, hub_client_online
from test_registry import BASE, SMALL, run

from ingest.synthetic import Population
from registry import edits, wspace
from registry.registry import Registry
from server.app import create_app

ALICE, BOB = "alice-token-0123", "bob-token-0123"
LORA = "pytorch_lora_weights.safetensors"


def card(glasses: int, smile: int) -> str:
    return f"---\nbase_model: {BASE}\nw2w:\n  attributes: {{glasses: {glasses}, smile: {smile}}}\n---\n# m\n"


class Hub:
    """alice pushed 8 public LoRAs labelled glasses and smile; the space is fitted with a glasses direction
    debiased against smile, and a smile direction."""

    def __init__(self, root):
        loras = root / "loras"
        Population(SMALL, seed=11).write(loras, 12, formats=("diffusers",), base_model=BASE)
        self.files = [p.read_bytes() for p in sorted(loras.glob("*.safetensors"))]
        self.reg = Registry.init(root / "hub")
        self.server = LiveServer(create_app(self.reg, {ALICE: "alice", BOB: "bob"}))
        for i in range(8):
            self.push(f"alice/pub{i}", i, glasses=i % 2, smile=(i // 2) % 2)
        run(self.reg.root, "fit", "--components", "3")
        self.fit_directions()

    def push(self, repo: str, i: int, glasses: int, smile: int, private: bool = False) -> None:
        from huggingface_hub import CommitOperationAdd, HfApi

        with hub_client_online():
            api = HfApi(endpoint=self.server.url, token=ALICE)
            api.create_repo(repo, private=private)
            ops = [
                CommitOperationAdd(LORA, self.files[i]),
                CommitOperationAdd("README.md", card(glasses, smile).encode()),
            ]
            api.create_commit(repo, ops, commit_message="push")

    def fit_directions(self) -> None:
        run(self.reg.root, "direction", "fit", "glasses", "--debias", "smile")
        run(self.reg.root, "direction", "fit", "smile")

    def get(self, path: str, token: str | None = None):
        status, _, body = self.server.request("GET", path, token=token)
        assert status == 200, (path, body)
        return body

    def post(self, path: str, body: dict, token: str):
        status, _, out = self.server.request("POST", path, body, token=token)
        assert status == 200, (path, out)
        return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Hub:
    h = Hub(tmp_path_factory.mktemp("directions"))
    yield h
    h.server.stop()


def answers(hub: Hub, token: str | None) -> dict:
    """Everything a caller learns of the directions: the list and a public model's sliders."""
    return {
        "directions": hub.get("/api/w2w/directions", token),
        "sliders": hub.get("/api/w2w/models/alice.pub1/preview", token)["directions"],
    }


def edited(hub: Hub, model: str, d, strength: float) -> np.ndarray:
    """What an edit by `strength` along direction d makes of `model` (edits.edit_vectors' arithmetic)."""
    m = hub.reg.get(model)
    sm = wspace.current(hub.reg, m.space_id)
    step = (sm.sub.components.astype(np.float64) @ d.step(strength)) * sm.sub.std
    return (hub.reg.vector(m).astype(np.float64) + step).astype(np.float32)


def test_a_private_model_changes_no_answer_of_those_who_may_not_read_it(hub):
    before = {who: answers(hub, token) for who, token in (("anonymous", None), ("bob", BOB), ("alice", ALICE))}
    assert before["anonymous"] == before["bob"] == before["alice"]  # nothing is hidden yet: the stored fit
    assert {d["attribute"] for d in before["anonymous"]["directions"]} == {"glasses", "smile"}
    sm = wspace.current(hub.reg, hub.reg.get("alice.pub0").space_id)
    public_glasses = edits.load_direction(hub.reg, sm, "glasses")

    # alice adds private models with labels unlike the public ones' average; the operator fits again
    hub.push("alice/secret1", 8, glasses=1, smile=0, private=True)
    hub.push("alice/secret2", 9, glasses=1, smile=1, private=True)
    hub.fit_directions()
    stored = edits.load_direction(hub.reg, sm, "glasses")
    assert stored.n_models == public_glasses.n_models + 2

    # the same numbers exactly: the same fit over the same models (those the caller may read)
    assert answers(hub, None) == before["anonymous"]
    assert answers(hub, BOB) == before["bob"]
    mine = answers(hub, ALICE)  # alice reads them all: the stored fit, private models included
    assert mine != before["alice"]
    assert {d["attribute"]: d["score_std"] for d in mine["directions"]}["glasses"] == stored.score_std

    # an edit and a mix move a model along the direction the caller sees
    bob_edit = hub.post("/api/w2w/edit", {"model": "alice.pub1", "directions": {"glasses": 1.0}}, BOB)
    name = bob_edit["models"][0]["name"]
    assert np.array_equal(hub.reg.vector(hub.reg.get(name)), edited(hub, "alice.pub1", public_glasses, 1.0))
    body = {"model": "alice.pub1", "directions": {"glasses": 1.0}, "name": "alice-edit"}
    alice_edit = hub.post("/api/w2w/edit", body, ALICE)
    assert np.array_equal(hub.reg.vector(hub.reg.get("alice-edit")), edited(hub, "alice.pub1", stored, 1.0))
    assert alice_edit["details"]["scores"] != bob_edit["details"]["scores"]
    hub.post("/api/w2w/mix", {"expr": "alice.pub2 + 0.5*glasses", "name": "bob-mix"}, BOB)
    want = edited(hub, "alice.pub2", public_glasses, 0.5)
    # mix reconstructs through the subspace (float32) and adds back the residual: ~1e-7 relative to |w|
    assert np.allclose(hub.reg.vector(hub.reg.get("bob-mix")), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_a_direction_that_cannot_be_fitted_over_what_a_caller_reads_is_missing_for_them(hub):
    if not hub.reg.ls(where="name = 'alice.secret2'"):
        hub.push("alice/secret1", 8, glasses=1, smile=0, private=True)
        hub.push("alice/secret2", 9, glasses=1, smile=1, private=True)
    # hat: 4 models each side, but two of the four with a hat are private (a binary fit needs 3 a side)
    hats = {"alice.pub0": 1, "alice.pub4": 1, "alice.secret1": 1, "alice.secret2": 1}
    for name in ("alice.pub0", "alice.pub1", "alice.pub2", "alice.pub3", "alice.pub4", "alice.pub5", *hats):
        m = hub.reg.get(name)
        hub.reg.update_model(m, attributes={**m.attributes, "hat": hats.get(name, 0)})
    run(hub.reg.root, "direction", "fit", "hat")
    assert "hat" in {d["attribute"] for d in hub.get("/api/w2w/directions", ALICE)}
    for token in (None, BOB):
        assert "hat" not in {d["attribute"] for d in hub.get("/api/w2w/directions", token)}
        assert "hat" not in {d["attribute"] for d in hub.get("/api/w2w/models/alice.pub1/preview", token)["directions"]}
        status, _, out = hub.server.request(
            "POST", "/api/w2w/edit", {"model": "alice.pub1", "directions": {"hat": 1}}, BOB
        )
        assert status == 400 and "no direction 'hat'" in out["error"], out


def test_a_private_server_lists_directions_to_token_holders_only(hub):
    server = LiveServer(create_app(hub.reg, {ALICE: "alice"}, private=True))
    try:
        assert server.request("GET", "/api/w2w/directions")[0] == 401
        assert server.request("GET", "/api/w2w/directions", token=ALICE)[0] == 200
    finally:
        server.stop()
