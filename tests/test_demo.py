"""`w2wreg demo`, reduced (few identities, few steps), end to end on the embedded toy-faces base model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from cli.demo import DIRECTION_COMPONENTS, PAIRS, QUICK
from cli.main import cli
from ingest.basemodel import TOY_BASE_DIR
from ingest.shown import GUIDANCE, SEEDS
from ingest.toyfaces import PAD


@pytest.mark.slow
@pytest.mark.skipif(not (TOY_BASE_DIR / "model_index.json").exists(), reason="the embedded base model is not built")
def test_reduced_demo_runs_end_to_end(tmp_path):
    res = CliRunner().invoke(
        cli,
        ["demo", "--quick", "--identities", "6", "--images", "2", "--steps", "4", "-B", "3", "--population", "16"]
        + ["--out", str(tmp_path)],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["identities"] == 6  # given values win over --quick's
    assert summary["population_identities"] == 16  # the shipped population, beside the live identities
    assert summary["inversion_steps"] == QUICK["invert_steps"]  # and --quick's fill the rest
    assert set(summary["edit_success_rate"]) <= {"glasses", "beard", "smile", "hat"}  # those with a direction
    assert 0.0 <= summary["inversion_attribute_agreement"] <= 1.0
    # every model is read as the detector's majority over images of several seeds (ingest.shown)
    assert summary["measured_seeds"] == list(SEEDS) and summary["direction_components"] == DIRECTION_COMPONENTS
    assert summary["render_guidance"] == GUIDANCE  # every measured and shown image is drawn at it
    assert all(0.0 <= v <= 1.0 for v in summary["lora_attribute_fidelity"].values())
    assert set(summary["edit_targets"]) == set(summary["edit_success_rate"])
    assert all(n == QUICK["targets"] for n in summary["edit_targets"].values())
    # samples: their attribute rates beside the registered identities' rates, and the largest gap between them
    assert summary["samples"] == QUICK["samples"] and summary["inversion_faces"] == QUICK["held_out"]
    rates, pop = summary["samples_attributes"], summary["population_attributes"]
    assert set(rates) == set(pop) == {"glasses", "beard", "smile", "hat"}
    assert summary["samples_largest_gap"] == pytest.approx(max(abs(rates[a] - pop[a]) for a in rates), abs=1e-3)
    shown = summary["population_shown_attributes"]  # what the identities' own LoRAs show, beside the labels
    assert set(shown) == set(pop) and all(0.0 <= v <= 1.0 for v in shown.values())
    assert summary["samples_largest_gap_shown"] == pytest.approx(max(abs(rates[a] - shown[a]) for a in rates), abs=1e-3)
    # the sheet shows like next to like: an identity before | after each edit, samples | their nearest trained
    # identity, held-out faces | their inversion; plus a strength ramp of one identity per direction
    sheet = {r["row"]: r["cells"] for r in summary["sheet"]}
    names = [f"face-{i:04d}" for i in range(6)] + [f"pop-{i:04d}" for i in range(16)]
    for a in summary["edit_success_rate"]:
        (row,) = [c for label, c in sheet.items() if label.startswith(f"identity | +{a} ")]
        assert 2 <= len(row) <= 2 * PAIRS and row[1::2] == [f"{n}.demo+{a}" for n in row[0::2]]
        (ramp,) = [c for label, c in sheet.items() if label.startswith(f"{row[0]} +{a}: ")]
        assert ramp[0] == row[0] and len(ramp) > 2
    samples = sheet["sample | nearest identity"]
    assert samples and all(s.startswith("sample-") for s in samples[0::2]) and set(samples[1::2]) <= set(names)
    inverted = sheet["held-out face | inverted into the space"]
    assert inverted[1::2] == [f"{h} inverted" for h in inverted[0::2]] and len(inverted) == 2 * QUICK["held_out"]
    with Image.open(tmp_path / "demo.png") as im:
        assert im.height == PAD + len(sheet) * (3 * 32 + PAD)  # one row of 96 px tiles per entry
        assert im.width > 2 * PAIRS * 3 * 32
    res = CliRunner().invoke(cli, ["--registry", str(tmp_path / "registry"), "verify"])
    assert res.exit_code == 0, res.output
