"""`w2wreg demo`, reduced (few identities, few steps), end to end on the embedded toy-faces base model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from cli.demo import QUICK
from cli.main import cli
from ingest.basemodel import TOY_BASE_DIR


@pytest.mark.slow
@pytest.mark.skipif(not (TOY_BASE_DIR / "model_index.json").exists(), reason="the embedded base model is not built")
def test_reduced_demo_runs_end_to_end(tmp_path):
    res = CliRunner().invoke(
        cli,
        ["demo", "--quick", "--identities", "6", "--images", "2", "--steps", "4", "-B", "3", "--out", str(tmp_path)],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["identities"] == 6  # given values win over --quick's
    assert summary["inversion_steps"] == QUICK["invert_steps"]  # and --quick's fill the rest
    assert set(summary["edit_success_rate"]) <= {"glasses", "beard", "smile", "hat"}  # those with a direction
    assert 0.0 <= summary["inversion_attribute_agreement"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in summary["lora_attribute_fidelity"].values())
    with Image.open(tmp_path / "demo.png") as im:
        assert im.width > 6 * 32 and im.height > 8 * 32
    res = CliRunner().invoke(cli, ["--registry", str(tmp_path / "registry"), "verify"])
    assert res.exit_code == 0, res.output
