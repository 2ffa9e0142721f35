"""A subspace fitted over private models says nothing of them to those who may not read them (issue 14): its
coefficients, the map, a search by the w2w metric, samples, edits along its directions, a mix through it, a
model's projection and a preview's sliders are refused (403) or left out for such a caller, and come back once
the operator fits over models everyone may read. A private model pushed after the fit is only projected: it
hides nothing.

Real parts only: a live server on loopback, the unmodified huggingface_hub client pushing the models (two
users, public and private repos), the registry's own fit.
"""

from __future__ import annotations

import pytest
from test_registry import run
from test_serve_directions import ALICE, BOB, Hub

RESTRICTED = [  # (method, path, body, status for who may use the subspace): each answer made through it
    ("GET", "/api/w2w/models/alice.pub1/project", None, 200),
    ("GET", "/api/w2w/map", None, 200),
    ("GET", "/api/w2w/search?like=alice.pub1&k=3&metric=w2w", None, 200),
    ("POST", "/api/w2w/sample", {"n": 1, "seed": 3}, 200),
    ("POST", "/api/w2w/edit", {"model": "alice.pub1", "directions": {"glasses": 1.0}}, 200),
    ("POST", "/api/w2w/mix", {"expr": "alice.pub2 + 0.5*glasses"}, 200),
    ("POST", "/api/w2w/mix", {"expr": "alice.pub2 + alice.pub3", "mode": "subspace"}, 200),
    # (this server draws no previews: a 400 saying so, after the edit was checked)
    ("GET", "/api/w2w/models/alice.pub1/preview.png?steps=1&edit=glasses=1", None, 400),
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Hub:
    h = Hub(tmp_path_factory.mktemp("subspace-privacy"))  # 8 public models, fitted: nothing hidden yet
    yield h
    h.server.stop()


def answers_of(hub: Hub, token: str | None) -> dict:
    """What a caller reads of the subspace without making anything."""
    detail = hub.get("/api/w2w/models/alice.pub1", token)
    preview = hub.get("/api/w2w/models/alice.pub1/preview", token)
    return {
        "projection": detail["projection"],
        "sliders": (preview["subspace"], preview["directions"]),
        "directions": hub.get("/api/w2w/directions", token),
    }


def test_a_subspace_fitted_over_private_models_is_refused_to_those_who_may_not_read_them(hub):
    # pushed after the fit: projected into it, not part of it, so nothing changes for bob
    hub.push("alice/secret1", 8, glasses=1, smile=0, private=True)
    hub.push("alice/secret2", 9, glasses=1, smile=1, private=True)
    for token in (None, BOB):
        assert hub.get("/api/w2w/models/alice.pub1/project", token)["coefficients"]
        assert hub.get("/api/w2w/map", token)["points"]
    assert hub.post("/api/w2w/sample", {"n": 1, "seed": 1}, BOB)["models"]

    run(hub.reg.root, "fit", "--components", "3")  # the operator fits again: over every model, private ones too
    hub.fit_directions()
    mine = answers_of(hub, ALICE)  # alice reads them all
    assert mine["projection"] is not None and mine["sliders"][1] and mine["directions"]
    for method, path, body, ok in RESTRICTED:
        status, _, out = hub.server.request(method, path, body, token=ALICE)
        assert status == ok, (path, out)
        status, _, out = hub.server.request(method, path, body, token=BOB)
        assert status == 403 and "fitted over models you may not read" in out["error"], (path, status, out)
        if method == "GET":
            assert hub.server.request(method, path)[0] == 403  # anonymous too
    for token in (None, BOB):  # left out where it is one part of a larger answer
        assert answers_of(hub, token) == {"projection": None, "sliders": (None, []), "directions": []}
        assert hub.get("/api/w2w/models/alice.pub1", token)["neighbours_metric"] == "l2"  # not ranked through it
    assert hub.get("/api/w2w/models/alice.pub1", ALICE)["neighbours_metric"] == "w2w"
    # a mix that needs no subspace is made in weight space, as in a space not fitted yet
    out = hub.post("/api/w2w/mix", {"expr": "alice.pub4 + alice.pub5", "name": "bob-sum"}, BOB)
    assert out["details"]["mode"] == "raw"
    out = hub.post("/api/w2w/mix", {"expr": "alice.pub4 + alice.pub5", "name": "alice-sum"}, ALICE)
    assert out["details"]["mode"] == "subspace"

    # fitted over what everyone may read: everything is back for bob, and the same as alice's
    run(hub.reg.root, "fit", "--components", "3", "--where", "name LIKE 'alice.pub%'")
    hub.fit_directions()
    assert answers_of(hub, BOB) == answers_of(hub, None)
    assert answers_of(hub, BOB)["projection"] == answers_of(hub, ALICE)["projection"]
    for i, (method, path, body, ok) in enumerate(RESTRICTED):
        if body:  # not the names alice's models took
            body = {**body, ("prefix" if "seed" in body else "name"): f"bob-{i}"}
        status, _, out = hub.server.request(method, path, body, token=BOB)
        assert status == ok, (path, out)
