"""`w2wreg serve`'s API fuzzed from its OpenAPI description (schemathesis), and its web page driven in a
real headless Chromium (Debian's chromium + chromium-driver; `.ci/run` installs them)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from served import LiveServer, chromium, needs_chromium
from test_registry import BASE, SMALL, run

from ingest.preview import Previewer
from ingest.synthetic import Population
from registry.registry import Registry
from server.app import create_app

TOKEN = "web-token-0123"


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    csv_path = Population(SMALL, seed=4).write(root / "loras", 12, formats=("diffusers",), base_model=BASE)
    reg_dir = root / "reg"
    run(reg_dir, "init")
    run(reg_dir, "add", str(root / "loras"), "--attrs-csv", str(csv_path))
    run(reg_dir, "fit", "--components", "4")
    run(reg_dir, "direction", "fit", "smile")
    reg = Registry.open(reg_dir)
    server = LiveServer(create_app(reg, {TOKEN: "fuzzer"}, renderer=Previewer()))  # the fuzzer asks for previews too
    yield server, reg
    server.stop()


def operations(url: str) -> list:
    """Every operation of the OpenAPI description the server publishes (an unreadable one fails the test)."""
    schema = schemathesis.openapi.from_url(f"{url}/api/w2w/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_api_answers_no_5xx(web):
    """Each operation, fuzzed with valid and invalid inputs (schemathesis' strategies driven by hypothesis).

    schemathesis' pytest plugin is not used (pytest runs with `-p no:schemathesis`): it reaches into pytest's
    internals and broke with pytest 9.2; its public strategies are stable API.
    """
    ops = operations(web[0].url)
    assert len(ops) >= 10, [op.label for op in ops]  # the whole API was read, not an empty description
    failures = []
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            def fuzz(case):
                # with the write token: the fuzzer also reaches edit, mix and sample past authentication
                case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=[not_a_server_error])

            try:
                fuzz()
            except Unsatisfiable:  # an operation without inputs has no invalid form: nothing to send
                assert mode is GenerationMode.NEGATIVE, op.label
            except Exception as e:  # every failing operation is reported, not just the first
                failures.append(f"{op.label} ({mode.value}): {type(e).__name__}: {str(e)[:500]}")
    assert not failures, "\n".join(failures)


@needs_chromium
def test_page_shows_a_search_result_in_chromium(web, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    server, reg = web
    with chromium() as driver:
        wait = WebDriverWait(driver, 30)
        driver.get(server.url + "/")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#map-svg circle")))
        n_models = len(reg.ls())  # 12, and whatever the fuzzer made
        assert len(driver.find_elements(By.CSS_SELECTOR, "#map-svg circle")) == n_models  # the map: every model
        box = driver.find_element(By.ID, "q")
        box.send_keys("identity_00003")
        driver.find_element(By.ID, "search-button").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "results-title"), "Nearest to identity_00003"))
        shown = [r.get_attribute("data-name") for r in driver.find_elements(By.CSS_SELECTOR, "#results .result-row")]
        assert shown == [h.model.name for h in reg.search("identity_00003", k=10).hits]
        Select(driver.find_element(By.ID, "metric")).select_by_value("w2w")  # who is alike, in the fitted space
        driver.find_element(By.ID, "search-button").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "results-title"), "(w2w)"))
        alike = [r.get_attribute("data-name") for r in driver.find_elements(By.CSS_SELECTOR, "#results .result-row")]
        assert alike == [h.model.name for h in reg.search("identity_00003", k=10, metric="w2w").hits]
        driver.find_element(By.CSS_SELECTOR, "#results .result-row a").click()  # open the nearest model
        wait.until(ec.text_to_be_present_in_element((By.ID, "model-name"), alike[0]))
        assert driver.find_elements(By.CSS_SELECTOR, "#neighbours .result-row")
        assert driver.save_screenshot(str(tmp_path / "page.png"))  # for a person: pytest --basetemp=DIR keeps it
