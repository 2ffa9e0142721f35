"""The registry end to end through the CLI: add, ls, show, search, export, push, verify, repair."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import w2wreg as run
from helpers import w2wreg_json as as_json

from cli.main import cli
from ingest.synthetic import Population
from registry.registry import Registry
from w2w.flatten import flatten, unflatten
from w2w.formats import read_lora, write_lora
from w2w.layout import Layout, LayoutEntry

# A small layout in canonical order (no diffusers needed): D = 2*(1*16 + 16*1) + 2*(1*24 + 16*1) = 144
SMALL = Layout(
    (
        LayoutEntry("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (1, 16), (16, 1), 27.0),
        LayoutEntry("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", (1, 16), (16, 1), 27.0),
        LayoutEntry("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", (1, 16), (16, 1), 27.0),
        LayoutEntry("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", (1, 24), (16, 1), 27.0),
    )
)
BASE = "tiny/base"


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("loras")
    csv_path = Population(SMALL, seed=1).write(out, 60, formats=("diffusers", "kohya", "peft"), base_model=BASE)
    return out, csv_path


@pytest.fixture
def filled(tmp_path, population) -> Path:
    folder, csv_path = population
    reg = tmp_path / "reg"
    run(reg, "init")
    run(reg, "add", str(folder), "--attrs-csv", str(csv_path))
    return reg


def test_add_folder_mixed_formats_with_attributes(filled, population):
    models = as_json(filled, "ls")
    assert len(models) == 60
    assert {m["source_format"] for m in models} == {"diffusers", "kohya", "peft"}
    assert len({m["space_id"] for m in models}) == 1, "one base model + one layout must be one space"
    pop = Population(SMALL, seed=1)
    m7 = next(m for m in models if m["name"] == "identity_00007")
    assert m7["attributes"] == pop.attributes(7)
    reg = Registry.open(filled)
    assert np.array_equal(reg.vector("identity_00007"), pop.vector(7))
    assert as_json(filled, "show", "identity_00007")["space"]["dim"] == SMALL.dim


def test_ls_where_filters_on_attributes(filled):
    pop = Population(SMALL, seed=1)
    expected = sorted(
        f"identity_{i:05d}" for i in range(60) if pop.attributes(i)["glasses"] and pop.attributes(i)["age"] > 30
    )
    got = sorted(m["name"] for m in as_json(filled, "ls", "--where", "glasses AND age > 30"))
    assert got == expected and got
    result = run(filled, "ls", "--where", "no_such_column > 1", code=1)
    assert "error: --where" in result.stderr and "glasses" in result.stderr and result.stderr[-1] == "\n"
    assert result.stderr.count("\n") == 1
    # a --where cannot write: the catalog is opened read-only for queries
    run(filled, "ls", "--where", "true; DELETE FROM models", code=1)
    assert len(as_json(filled, "ls")) == 60


def brute_force(reg: Registry, query: str, k: int, metric: str, names: list[str] | None = None):
    from w2w.distance import delta_distances

    models = reg.ls()
    cands = [m for m in models if m.name != query and (names is None or m.name in names)]
    q = reg.vector(query)
    X = np.stack([reg.vector(m) for m in cands]).astype(np.float64)
    if metric != "delta":
        q = q.astype(np.float64)  # a float32 q would make norm(q) float32: off by ~6e-8
    if metric == "l2":
        d = np.linalg.norm(X - q, axis=1)
    elif metric == "cosine":
        d = 1 - X @ q / (np.linalg.norm(X, axis=1) * np.linalg.norm(q))
    else:
        d = delta_distances(q, X.astype(np.float32), reg.layout(models[0].space_id))
    order = np.argsort(d, kind="stable")[:k]
    return [cands[i].name for i in order], d[order]


@pytest.mark.parametrize("metric", ["l2", "cosine", "delta"])
def test_search_is_exact_with_and_without_filter(filled, metric):
    reg = Registry.open(filled)
    res = as_json(filled, "search", "--like", "identity_00003", "-k", "7", "--metric", metric)
    names, dists = brute_force(reg, "identity_00003", 7, metric)
    assert [r["name"] for r in res["results"]] == names
    # the k returned are recomputed in float64 (registry.search._direct), as here: sums of D = 144 terms err by
    # <= 144 u64 = 1.6e-14 of the sum of their magnitudes, for l2 and delta ~that relative to d, for cosine (|cos| <= 1)
    # absolute. 1e-9 is slack over that, yet far below float32 kernel distances (~1e-6 off) leaking out.
    # delta ranks and reports from float32 Grams of the factors (w2w.delta.search_distance): each Gram entry sums
    # <= 24 products, within 24 u32 = 1.4e-6 of their magnitudes, and d^2 ~ n1 + n2 here (unrelated models), so d
    # is within ~1e-6 relative; 1e-5 is slack over that.
    rtol = 1e-5 if metric == "delta" else 1e-9
    assert np.allclose([r["distance"] for r in res["results"]], dists, rtol=rtol, atol=1e-9)
    # the filter is applied before ranking: exactly k results, all matching, the best among those
    res = as_json(
        filled, "search", "--like", "identity_00003", "-k", "7", "--metric", metric, "--where", "hat AND NOT smile"
    )
    allowed = [m.name for m in reg.ls("hat AND NOT smile")]
    names, _ = brute_force(reg, "identity_00003", 7, metric, allowed)
    assert len(res["results"]) == 7
    assert [r["name"] for r in res["results"]] == names


def test_search_by_file_and_factorization_invariance(filled, tmp_path):
    reg = Registry.open(filled)
    lora = reg.lora("identity_00010")
    # the same update, factored differently: B*2, A/2. l2 sees a different vector, delta sees the same model.
    other = unflatten(flatten(lora), SMALL, BASE)
    for layer in other.layers.values():
        layer.A /= 2
        layer.B *= 2
    path = tmp_path / "refactored.safetensors"
    write_lora(other, path, "diffusers")
    res = as_json(filled, "search", "--like", str(path), "-k", "1", "--metric", "delta")
    assert res["results"][0]["name"] == "identity_00010"
    # B*2 and A/2 are exact in binary, so the update is the same to the bit: only the Gram form's cancellation is
    # left, ~sqrt(n u64) ~ 1e-7 of sum ||dW|| (see test_formats); 1e-3 is far below the distance to another model
    assert res["results"][0]["distance"] < 1e-3
    res = as_json(filled, "search", "--like", str(path), "-k", "1", "--metric", "l2")
    assert res["results"][0]["distance"] > 0.1


def test_duplicates_are_skipped_not_added(filled, population, tmp_path):
    folder, _ = population
    result = run(filled, "add", str(folder / "identity_00000.safetensors"))
    assert "skipped" in result.stderr and "identity_00000" in result.stderr
    # the same weights in another format are the same model
    lora = Registry.open(filled).lora("identity_00000")
    write_lora(lora, tmp_path / "again.safetensors", "kohya")
    result = run(filled, "add", str(tmp_path / "again.safetensors"))
    assert "same weights as 'identity_00000'" in result.stderr
    assert len(as_json(filled, "ls")) == 60


def test_bad_input_leaves_registry_unchanged(filled, tmp_path):
    good = tmp_path / "batch"
    Population(SMALL, seed=2).write(good, 3, prefix="fresh", base_model=BASE)
    (good / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = run(filled, "add", str(good), code=1)
    assert "broken.safetensors" in result.stderr and "nothing added" in result.stderr
    assert len(as_json(filled, "ls")) == 60
    assert as_json(filled, "verify")["ok"]
    reg = Registry.open(filled)
    assert reg.store(reg.spaces()[0]).rows_on_disk() == 60, "an aborted add must leave no rows behind"
    result = run(filled, "add", str(good), "--skip-errors", code=1)
    assert len(as_json(filled, "ls")) == 63
    assert as_json(filled, "verify")["ok"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"\x00" * 3), "too short"),
        (lambda p: p.write_bytes((2**40).to_bytes(8, "little") + b"{}"), "header"),
        (lambda p: p.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{}"), "truncated"),
    ],
)
def test_corrupt_files_get_one_line_errors(filled, tmp_path, make, message):
    bad = tmp_path / "bad.safetensors"
    make(bad)
    result = run(filled, "add", str(bad), code=1)
    lines = [l for l in result.stderr.splitlines() if l.startswith("error")]
    assert len(lines) == 1 and message in lines[0] and "bad.safetensors" in lines[0]


def test_nan_and_shape_errors(filled, tmp_path):
    lora = Registry.open(filled).lora("identity_00001")
    first = next(iter(lora.layers.values()))
    first.B[0, 0] = np.nan
    write_lora(lora, tmp_path / "nan.safetensors", "diffusers")
    assert "NaN" in run(filled, "add", str(tmp_path / "nan.safetensors"), code=1).stderr
    from safetensors.numpy import save_file

    bad_rank = {
        "unet.a.to_q.lora_A.weight": np.ones((2, 4), np.float32),
        "unet.a.to_q.lora_B.weight": np.ones((4, 3), np.float32),
    }
    save_file(bad_rank, str(tmp_path / "rank.safetensors"))
    assert "rank" in run(filled, "add", str(tmp_path / "rank.safetensors"), code=1).stderr
    assert as_json(filled, "verify")["ok"]


def test_pickles_are_refused_unless_opted_in(filled, tmp_path):
    import torch

    lora = Registry.open(filled).lora("identity_00002")
    from w2w.formats import diffusers as dfmt

    tensors, _ = dfmt.to_tensors(lora.scaled(1.5))
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, tmp_path / "model.bin")
    result = run(filled, "add", str(tmp_path / "model.bin"), "--base-model", BASE, code=1)
    assert "--allow-pickle" in result.stderr
    run(filled, "add", str(tmp_path / "model.bin"), "--base-model", BASE, "--allow-pickle")
    assert as_json(filled, "show", "model")["source_format"] == "diffusers"


def test_unknown_model_and_name_errors(filled, population, tmp_path):
    result = run(filled, "show", "identity_0000x", code=1)
    assert "no model named" in result.stderr and "identity_0000" in result.stderr
    run(filled, "search", "--like", "nobody", code=1)
    lora = Registry.open(filled).lora("identity_00004").scaled(2.0)
    write_lora(lora, tmp_path / "x.safetensors", "diffusers")
    result = run(filled, "add", str(tmp_path / "x.safetensors"), "--name", "identity_00004", code=1)
    assert "taken" in result.stderr
    run(
        filled,
        "add",
        str(tmp_path / "x.safetensors"),
        "--name",
        "identity_00004_v2",
        "--attr",
        "glasses=true",
        "--attr",
        "age=50",
    )
    assert as_json(filled, "show", "identity_00004_v2")["attributes"] == {"glasses": True, "age": 50.0}
    assert "not a number" in run(filled, "add", str(tmp_path / "x.safetensors"), "--attr", "age=old", code=1).stderr


def test_export_all_formats_round_trip(filled, tmp_path):
    reg = Registry.open(filled)
    v = reg.vector("identity_00005")
    for fmt, target in (("diffusers", tmp_path / "d"), ("peft", tmp_path / "p"), ("kohya", tmp_path / "k.safetensors")):
        out = as_json(filled, "export", "identity_00005", "--format", fmt, "-o", str(target))
        rr = read_lora(target if fmt != "diffusers" else Path(out["files"][0]))
        assert rr.format == fmt
        assert np.array_equal(flatten(rr.lora), v)
        assert rr.lora.base_model == BASE


def test_push_then_import_into_another_registry(filled, tmp_path):
    team_hub = tmp_path / "team-hub"
    out = as_json(filled, "push", "identity_00006", "--repo", "team/alice", "--hub", str(team_hub))
    repo = team_hub / "team" / "alice"
    card = (repo / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: tiny/base" in card and "library_name: diffusers" in card
    assert "- lora" in card and "- w2w" in card
    assert (repo / "pytorch_lora_weights.safetensors").exists()
    other = tmp_path / "other"
    run(other, "init")
    run(other, "add", "hub:team/alice", "--hub", str(team_hub))
    shown = as_json(other, "show", "alice")
    assert shown["source"] == f"hub:folder:{team_hub.resolve()}/team/alice@{out['revision']}"
    # a push to another folder hub is not this registry's to verify: verify stays clean
    assert as_json(filled, "verify")["ok"]
    assert np.array_equal(Registry.open(other).vector("alice"), Registry.open(filled).vector("identity_00006"))
    run(other, "add", f"hub:team/alice@{'0' * 12}", "--hub", str(team_hub), code=1)
    run(filled, "push", "identity_00006", "--repo", "../escape", code=1)


def test_verify_detects_and_repair_fixes(filled):
    reg = Registry.open(filled)
    run(filled, "push", "identity_00008", "--repo", "me/eight")
    space = reg.spaces()[0]
    store = reg.store(space)
    # 1. an interrupted write: rows on disk the catalog never committed
    store.write_rows(space.n_models, np.ones((2, space.dim), np.float32))
    assert "uncommitted" in run(filled, "verify", code=3).stdout
    # 2. a damaged vector row of a model that has a hub copy
    m = reg.get("identity_00008")
    with open(store.shard_path(0), "r+b") as f:
        f.seek(m.row_idx * store.row_bytes)
        f.write(b"\x00" * 16)
    # 3. a damaged vector of a model without one
    m9 = reg.get("identity_00009")
    with open(store.shard_path(0), "r+b") as f:
        f.seek(m9.row_idx * store.row_bytes + 8)
        f.write(b"\x01" * 8)
    report = json.loads(run(filled, "verify", "--json", code=3).stdout)
    whats = " ".join(f["what"] for f in report["findings"])
    assert "identity_00008" in whats and "identity_00009" in whats
    result = run(filled, "repair", code=3)  # identity_00009 cannot be restored: no copy anywhere
    assert "restored from hub" in result.stdout and "uncommitted" in result.stdout
    assert store.rows_on_disk() == space.n_models
    left = json.loads(run(filled, "verify", "--json", code=3).stdout)["findings"]
    assert [f["what"] for f in left if f["kind"] == "error"] == [f"model identity_00009 (id {m9.id})"]
    assert np.array_equal(reg.vector("identity_00008"), Population(SMALL, seed=1).vector(8))


def test_damaged_hub_file_is_pushed_again(filled):
    run(filled, "push", "identity_00011", "--repo", "me/eleven")
    weights = filled / "hub" / "me" / "eleven" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    assert "differs" in run(filled, "verify", code=3).stdout
    run(filled, "repair")
    assert as_json(filled, "verify")["ok"]


def test_a_new_writer_drops_a_crashed_writers_tail(filled, tmp_path):
    reg = Registry.open(filled)
    space = reg.spaces()[0]
    reg.store(space).write_rows(space.n_models, np.full((3, space.dim), 7, np.float32))
    Population(SMALL, seed=3).write(tmp_path / "more", 2, prefix="late", base_model=BASE)
    run(filled, "add", str(tmp_path / "more"))
    assert as_json(filled, "verify")["ok"]
    assert np.array_equal(reg.vector("late_00001"), Population(SMALL, seed=3).vector(1))


def test_two_writers_take_turns(filled, tmp_path):
    for i in range(2):
        Population(SMALL, seed=10 + i).write(tmp_path / f"w{i}", 15, prefix=f"writer{i}", base_model=BASE)
    env = {**os.environ, "W2WREG_HOME": str(filled)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cli", "add", str(tmp_path / f"w{i}")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    assert len(as_json(filled, "ls")) == 90
    assert as_json(filled, "verify")["ok"]


def test_layouts_never_mix(filled, tmp_path):
    other = Layout(SMALL.entries[:2])
    write_lora(unflatten(np.ones(other.dim, np.float32), other, BASE), tmp_path / "small.safetensors", "diffusers")
    run(filled, "add", str(tmp_path / "small.safetensors"))
    spaces = {m["space_id"] for m in as_json(filled, "ls")}
    assert len(spaces) == 2
    res = as_json(filled, "search", "--like", "small", "-k", "5")
    assert res["results"] == []  # alone in its space: nothing to compare with
    run(filled, "search", "--like", "identity_00001", "-k", "100", "--json")


def test_missing_registry_is_a_clear_error(tmp_path):
    result = run(tmp_path / "nowhere", "ls", code=1)
    assert "w2wreg init" in result.stderr


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    for name in cli.commands:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "w2wreg " in result.output, f"`{name} --help` shows no example"


def test_export_refuses_to_overwrite(filled, tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"precious")
    result = run(filled, "export", "identity_00001", "--format", "kohya", "-o", str(target), code=1)
    assert "--force" in result.stderr and target.read_bytes() == b"precious"
    run(filled, "export", "identity_00001", "--format", "kohya", "-o", str(target), "--force")
    assert read_lora(target).format == "kohya"


def test_csv_kinds_and_headers(filled, tmp_path):
    Population(SMALL, seed=21).write(tmp_path / "more", 2, prefix="kind", base_model=BASE)
    (tmp_path / "dup.csv").write_text("name,stars,stars\nkind_00000,1,2\n")
    assert "repeats the column 'stars'" in run(filled, "add", str(tmp_path / "more"), "--attrs-csv",
                                                str(tmp_path / "dup.csv"), code=1).stderr  # fmt: skip
    # age is numeric in the registry: a column of 0/1 ages stays numeric instead of clashing as booleans
    (tmp_path / "ages.csv").write_text("name,age\nkind_00000,1\nkind_00001,0\n")
    run(filled, "add", str(tmp_path / "more"), "--attrs-csv", str(tmp_path / "ages.csv"))
    assert as_json(filled, "show", "kind_00000")["attributes"] == {"age": 1.0}


def test_damaged_middle_shard_is_reported_not_a_traceback(tmp_path, monkeypatch):
    import registry.registry as registry_module

    monkeypatch.setattr(registry_module, "rows_per_shard_for", lambda dim: 8)
    reg_dir = tmp_path / "small-shards"
    run(reg_dir, "init")
    Population(SMALL, seed=5).write(tmp_path / "l", 30, base_model=BASE)
    run(reg_dir, "add", str(tmp_path / "l"))
    run(reg_dir, "push", "identity_00017", "--repo", "me/seventeen")
    reg = Registry.open(reg_dir)
    os.truncate(reg.store(reg.spaces()[0]).shard_path(2), 100)  # rows 16..23
    report = json.loads(run(reg_dir, "verify", "--json", code=3).stdout)
    missing = sorted(f["what"].split()[1] for f in report["findings"] if "missing" in f["detail"])
    assert missing == [f"identity_{i:05d}" for i in range(16, 24)]
    result = run(reg_dir, "export", "identity_00018", "-o", str(tmp_path / "o"), code=1)
    assert result.stderr.startswith("error: ") and "w2wreg verify" in result.stderr
    assert "restored from hub" in run(reg_dir, "repair", code=3).stdout
    assert np.array_equal(reg.vector("identity_00017"), Population(SMALL, seed=5).vector(17))


def test_a_refused_add_of_a_new_space_leaves_no_folder(population, tmp_path):
    """A good file and a broken one: nothing is added, and nothing of the space the good one would have made
    stays on disk (verify sees no orphan)."""
    folder, _ = population
    good = next(iter(sorted(folder.glob("*.safetensors"))))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    reg = tmp_path / "reg"
    run(reg, "init")
    result = run(reg, "add", str(good), str(tmp_path / "broken.safetensors"), code=1)
    assert "nothing added" in result.stderr
    assert not any((reg / "vectors").iterdir())
    assert "orphan" not in run(reg, "verify").output


def test_names_from_folders_and_the_hugging_face_cache(population, tmp_path):
    """Same-named files of one add are named after their folders; a file of the Hugging Face cache after its
    repo, not its snapshot's commit."""
    folder, _ = population
    files = sorted(folder.glob("*.safetensors"))[:3]
    for sub, f in zip(("a", "b"), files, strict=False):
        (tmp_path / sub).mkdir()
        shutil.copy(f, tmp_path / sub / "lora.safetensors")
    snapshot = tmp_path / "hf" / "models--team--alice" / "snapshots" / ("0123abcd" * 5)
    snapshot.mkdir(parents=True)
    shutil.copy(files[2], snapshot / "pytorch_lora_weights.safetensors")
    reg = tmp_path / "reg"
    run(reg, "init")
    run(reg, "add", str(tmp_path / "a" / "lora.safetensors"), str(tmp_path / "b" / "lora.safetensors"), str(snapshot))
    assert sorted(m["name"] for m in as_json(reg, "ls")) == ["a.lora", "alice", "b.lora"]


def test_search_takes_what_add_takes_and_drops_a_text_encoder_part(filled, tmp_path):
    """A query as `add` would read it: a folder holding one LoRA file (no adapter_config.json) works; a text
    encoder part is kept, as `add` keeps it, and --drop-text-encoder (which search has) compares the UNet part."""
    from safetensors.numpy import save_file

    from w2w.formats import diffusers as dfmt

    tensors, meta = dfmt.to_tensors(Registry.open(filled).lora("identity_00007"))
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    tensors[f"{te}.lora_A.weight"] = np.ones((2, 12), dtype=np.float32)
    tensors[f"{te}.lora_B.weight"] = np.ones((12, 2), dtype=np.float32)
    (tmp_path / "query").mkdir()
    save_file(tensors, str(tmp_path / "query" / "pytorch_lora_weights.safetensors"), metadata=meta)
    result = run(filled, "search", "--like", str(tmp_path / "query"), code=1)
    assert "pass --drop-text-encoder" in result.stderr
    res = as_json(filled, "search", "--like", str(tmp_path / "query"), "-k", "1", "--drop-text-encoder")
    assert res["results"][0]["name"] == "identity_00007" and res["results"][0]["distance"] == 0.0  # same bits
    shutil.copy(tmp_path / "query" / "pytorch_lora_weights.safetensors", tmp_path / "query" / "second.safetensors")
    result = run(filled, "search", "--like", str(tmp_path / "query"), code=1)
    assert "holds 2 LoRAs" in result.stderr and "pass one of them" in result.stderr
