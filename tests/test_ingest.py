"""`w2wreg ingest` end to end on a tiny base model saved as a diffusers folder: train, register, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
from click.testing import CliRunner

from cli.main import cli
from ingest import toyfaces
from ingest.fanout import run_ingest
from ingest.trainer import get_recipe
from registry.registry import Registry


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def test_ingest_trains_registers_and_a_rerun_skips(tmp_path, tiny_base, faces):
    reg = tmp_path / "reg"
    out = run("--registry", reg, "ingest", faces, "--base-model", tiny_base, "--steps", 3, "-B", 2, "--json")
    data = json.loads(out.stdout)
    assert sorted(a["name"] for a in data["added"]) == [f"face-{i:04d}" for i in range(5)]
    assert data["failed"] == [] and data["recipe"]["steps"] == 3
    r = Registry.open(reg)
    m = r.get("face-0003")
    truth = {f.name: f for f in toyfaces.random_faces(5, seed=0)}["face-0003"]
    assert m.kind == "trained" and m.base_model == str(tiny_base.resolve())
    assert {k: m.attributes[k] for k in toyfaces.ATTRIBUTES} == truth.attributes
    lineage = r.catalog.lineage(m.id)
    assert lineage[0]["operation"] == "train" and lineage[0]["params"]["steps"] == 3
    assert "- train" in r.model_card(m)
    lora = r.lora(m)
    assert all(np.any(l.B != 0) for l in lora.layers.values())
    # the same images again: nothing trained, everything skipped
    again = json.loads(
        run("--registry", reg, "ingest", faces, "--base-model", tiny_base, "--steps", 3, "--json").stdout
    )
    assert again["added"] == [] and len(again["skipped"]) == 5
    run("--registry", reg, "verify")


def test_batched_ingest_registers_the_same_models_as_one_at_a_time(tmp_path, tiny_base, faces):
    recipe = get_recipe("toy", steps=3)
    vecs = {}
    for b in (1, 3):
        r = Registry.init(tmp_path / f"reg{b}")
        rep = run_ingest(r, faces, recipe, base_model=str(tiny_base), batch_identities=b, progress=False)
        assert len(rep.added) == 5
        vecs[b] = {m.name: r.vector(m) for m in r.ls()}
    # float32 sums in another order differ by ~1e-7; Adam divides each gradient element by its own scale, so
    # where a gradient is near 0 that difference can grow to ~lr * 1e-3 (lr 3e-2) over a few steps
    for name, v in vecs[1].items():
        np.testing.assert_allclose(vecs[3][name], v, atol=3e-4, rtol=1e-3)


def test_a_failing_identity_is_reported_and_the_rest_go_on(tmp_path, tiny_base, faces):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(faces, ds)
    r = Registry.init(tmp_path / "reg")

    def break_a_later_identity(results):  # an image goes bad after validation, before its batch trains
        (ds / "face-0004" / "00.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    rep = run_ingest(
        r,
        ds,
        get_recipe("toy", steps=2),
        base_model=str(tiny_base),
        batch_identities=2,
        progress=False,
        on_batch=break_a_later_identity,
    )
    assert [n for n, _ in rep.failed] == ["face-0004"]
    assert "00.png" in rep.failed[0][1]
    assert sorted(n for n, _ in rep.added) == [f"face-{i:04d}" for i in range(4)]


def test_bad_datasets_are_refused_before_training(tmp_path, tiny_base, faces):
    import shutil

    reg = tmp_path / "reg"
    run("--registry", reg, "init")
    res = run("--registry", reg, "ingest", tmp_path / "nope", ok=False)
    assert res.exit_code != 0 and "no such dataset folder" in res.output
    ds = tmp_path / "ds"
    shutil.copytree(faces, ds)
    (ds / "face-0009").mkdir()
    res = run("--registry", reg, "ingest", ds, "--base-model", tiny_base, ok=False)
    assert res.exit_code != 0 and "face-0009" in res.output
    assert Registry.open(reg).ls() == []
    res = run("--registry", reg, "ingest", faces, "--base-model", tmp_path, ok=False)
    assert res.exit_code != 0 and "model_index.json" in res.output


def test_an_ingest_killed_mid_run_finishes_on_rerun(tmp_path, tiny_base, faces):
    reg = tmp_path / "reg"
    run("--registry", reg, "init")
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "--registry",
        str(reg),
        "ingest",
        str(faces),
        "--base-model",
        str(tiny_base),
        "--steps",
        "60",
    ]
    env = {**os.environ, "TQDM_MININTERVAL": "0"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)
    seen = b""
    deadline = time.time() + 240
    while not re.search(rb"training:[^\r\n]*\s[1-4]/5\s", seen) and time.time() < deadline:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = Registry.open(reg).ls()
    assert 1 <= len(first) < 5, seen[-500:]
    out = json.loads(run("--registry", reg, "ingest", faces, "--base-model", tiny_base, "--steps", 60, "--json").stdout)
    assert len(out["added"]) == 5 - len(first) and len(out["skipped"]) == len(first)
    assert len(Registry.open(reg).ls()) == 5
    run("--registry", reg, "verify")


def test_ingest_on_a_dask_local_cluster_gives_the_in_process_models(tmp_path, tiny_base, faces):
    recipe = get_recipe("toy", steps=2)
    here = Registry.init(tmp_path / "here")
    run_ingest(here, faces, recipe, base_model=str(tiny_base), batch_identities=2, progress=False)
    there = Registry.init(tmp_path / "there")
    rep = run_ingest(there, faces, recipe, base_model=str(tiny_base), batch_identities=2, workers=2, progress=False)
    assert rep.failed == [] and len(rep.added) == 5
    for m in here.ls():
        np.testing.assert_allclose(there.vector(m.name), here.vector(m), atol=3e-4, rtol=1e-3)  # see above
