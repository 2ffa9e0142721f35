"""The page's previews and edit sliders (issue 16, part 4): images of models drawn by `w2wreg serve` on the
embedded toy base (and on a configured diffusers base), bounded, cached, queued and private where their
models are; the edit panel driven in a real headless Chromium.

Real parts only: a live server on loopback, raw HTTP (http.client) and the unmodified huggingface_hub
client, the real toy pipeline and an SD pipeline folder built in code, Debian's chromium.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import W2W_TARGETS, random_lora
from PIL import Image
from served import LiveServer, chromium, hub_client_online, needs_chromium
from test_registry import run

from ingest import render
from ingest.basemodel import TOY_BASE_DIR, TOY_BASE_ID, TOY_UNET_CONFIG, load_base
from ingest.preview import Previewer, torch_threads
from registry import edits, wspace
from registry.registry import NewModel, Registry
from server.app import create_app
from server.previews import Busy, Gate, ImageCache, Limits, parse_edit
from w2w.flatten import unflatten
from w2w.formats import write_lora
from w2w.presets import unet_layout

pytestmark = pytest.mark.skipif(
    not (TOY_BASE_DIR / "model_index.json").exists(), reason="the embedded base model is not built"
)
ALICE, BOB = "alice-token-0123", "bob-token-0123"
TOY_LAYOUT = unet_layout(TOY_UNET_CONFIG, W2W_TARGETS, rank=1, alpha=1.0)  # the toy recipe's
STEPS = 4  # enough for distinct pictures, fast on 2 cores
PNG_PATH = "/api/w2w/models/{}/preview.png"


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def drawn(lora, seed: int, steps: int, base_model: str | None = None) -> np.ndarray:
    """What `w2wreg render` draws of `lora` for one seed, on one CPU thread as the server draws."""
    with torch_threads(1):
        return render.images(load_base(base_model), lora, render.Settings(seeds=(seed,), steps=steps))[0]


class ToyHub:
    """A served registry: 8 toy identities (half with glasses; fitted, with a glasses direction), one model of
    another base, and alice's private toy model pushed to alice/secret with the huggingface_hub client."""

    def __init__(self, root, tiny_layout):
        reg_dir = root / "reg"
        self.reg = Registry.init(reg_dir)
        self.reg.add_models(
            NewModel.from_lora(
                f"toy-{i}",
                random_lora(TOY_LAYOUT, seed=i, scale=0.25),
                base_model=TOY_BASE_ID,
                attributes={"glasses": i % 2 == 0},
            )
            for i in range(8)
        )
        run(reg_dir, "fit", "-k", "4")
        run(reg_dir, "direction", "fit", "glasses")
        self.reg.add_models([NewModel.from_lora("stranger", random_lora(tiny_layout, seed=3, scale=0.5))])
        self.app = create_app(self.reg, {ALICE: "alice", BOB: "bob"}, renderer=Previewer())
        self.server = LiveServer(self.app)
        self.previews = self.app.state.previews
        write_lora(random_lora(TOY_LAYOUT, seed=20, scale=0.25), root / "secret")
        with hub_client_online():
            from huggingface_hub import CommitOperationAdd, HfApi

            api = HfApi(endpoint=self.server.url, token=ALICE)
            api.create_repo("alice/secret", private=True)
            card = f"---\nbase_model: {TOY_BASE_ID}\n---\n# secret\n".encode()
            ops = [CommitOperationAdd(p.name, p) for p in (root / "secret").iterdir()]
            api.create_commit("alice/secret", [*ops, CommitOperationAdd("README.md", card)], commit_message="secret")

    def png(self, ref: str, token: str | None = None, headers: dict | None = None, **params):
        import urllib.parse

        query = urllib.parse.urlencode({"steps": STEPS} | params)
        status, got, body = self.server.request("GET", PNG_PATH.format(ref) + "?" + query, token=token, headers=headers)
        return status, {k.lower(): v for k, v in got.items()}, body


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_layout):
    h = ToyHub(tmp_path_factory.mktemp("previews"), tiny_layout)
    yield h
    h.server.stop()


def test_preview_info_says_what_can_be_drawn(hub):
    status, _, info = hub.server.get("/api/w2w/models/toy-0/preview")
    assert status == 200 and info["available"], info
    assert (info["base"], info["size"], info["max_size"]) == (TOY_BASE_ID, 32, 32)
    assert (info["steps"], info["max_steps"], info["max_strength"]) == (20, 50, 5.0)
    (d,) = info["directions"]
    assert d["attribute"] == "glasses" and d["score_std"] > 0
    m = hub.reg.get("toy-0")
    sm = wspace.current(hub.reg, m.space_id)
    glasses = edits.load_direction(hub.reg, sm, "glasses")
    score = (glasses.scores(wspace.coefficients(hub.reg, sm, [m.id])[0]) - glasses.score_mean) / glasses.score_std
    assert d["score"] == pytest.approx(float(score), rel=1e-12)  # the same arithmetic on the same numbers
    status, _, info = hub.server.get("/api/w2w/models/stranger/preview")
    assert status == 200 and not info["available"] and "does not run base model" in info["reason"]


def test_a_preview_is_what_render_draws_and_an_edit_moves_it(hub):
    m = hub.reg.get("toy-1")
    status, headers, data = hub.png("toy-1", seed=3)
    assert status == 200 and headers["content-type"] == "image/png", data
    assert headers["cache-control"] == "private, no-cache" and headers["x-content-type-options"] == "nosniff"
    original = decode(data)
    assert original.shape == (32, 32, 3)
    assert np.array_equal(original, drawn(hub.reg.lora(m), 3, STEPS))

    status, _, data = hub.png("toy-1", seed=3, edit="glasses=2.5")
    assert status == 200, data
    edited = decode(data)
    (w,) = edits.edit_vectors(hub.reg, m, {"glasses": 2.5})
    lora = unflatten(w.astype(np.float32), hub.reg.layout(m.space_id), m.base_model)
    assert np.array_equal(edited, drawn(lora, 3, STEPS))
    assert np.abs(edited.astype(int) - original.astype(int)).mean() > 1  # the edit shows

    # the default steps (20) and another seed: another picture; a zero edit is the model itself
    assert np.array_equal(decode(hub.png("toy-1", seed=3, steps=20)[2]), drawn(hub.reg.lora(m), 3, 20))
    assert not np.array_equal(decode(hub.png("toy-1", seed=4)[2]), original)
    assert np.array_equal(decode(hub.png("toy-1", seed=3, edit="glasses=0")[2]), original)


def test_saving_an_edit_registers_it_with_its_lineage_and_the_same_picture(hub):
    status, _, edited = hub.png("toy-2", seed=1, edit="glasses=-1.5")
    assert status == 200
    body = {"model": "toy-2", "directions": {"glasses": -1.5}, "name": "toy-2-noglasses"}
    assert hub.server.request("POST", "/api/w2w/edit", body)[0] == 401  # a write needs a token
    status, _, out = hub.server.request("POST", "/api/w2w/edit", body, token=BOB)
    assert status == 200 and out["models"][0]["name"] == "toy-2-noglasses", out
    new = hub.reg.get("toy-2-noglasses")
    (step,) = hub.reg.catalog.lineage(new.id)
    assert (step["parent"], step["operation"], step["params"]["directions"]) == ("toy-2", "edit", {"glasses": -1.5})
    # the saved model's own preview is the image the slider showed: the same weights, the same picture
    assert hub.png("toy-2-noglasses", seed=1)[2] == edited


def test_previews_are_cached_by_what_determines_them(hub):
    before = len(hub.previews.cache)
    status, headers, first = hub.png("toy-3", seed=9, edit="glasses=1")
    assert status == 200 and len(hub.previews.cache) == before + 1
    t0 = time.perf_counter()
    status, headers2, again = hub.png("toy-3", seed=9, edit="glasses=1.0")  # the same weights, spelled otherwise
    assert again == first and len(hub.previews.cache) == before + 1 and headers2["etag"] == headers["etag"]
    assert time.perf_counter() - t0 < 5  # no render (a loose bound: the machine is shared)
    status, headers3, body = hub.png("toy-3", headers={"If-None-Match": headers["etag"]}, seed=9, edit="glasses=1")
    assert status == 304 and not body
    assert hub.png("toy-3", seed=9, edit="glasses=1.1")[1]["etag"] != headers["etag"]


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({"steps": 0}, 422, "steps"),
        ({"steps": 51}, 422, "steps"),
        ({"seed": -1}, 422, "seed"),
        ({"seed": 2**31}, 422, "seed"),
        ({"size": 12}, 400, "multiples of 8 from 8 to 32"),
        ({"size": 64}, 400, "multiples of 8 from 8 to 32"),
        ({"size": 100000}, 422, "size"),
        ({"edit": "glasses=5.5"}, 400, "within +-5"),
        ({"edit": "glasses=nan"}, 400, "within +-5"),
        ({"edit": "glasses=inf"}, 400, "within +-5"),
        ({"edit": "glasses=x"}, 400, "is not a number"),
        ({"edit": "glasses"}, 400, "expected ATTRIBUTE=STRENGTH"),
        ({"edit": "glasses=1,glasses=2"}, 400, "twice"),
        ({"edit": "../../catalog=1"}, 400, "expected ATTRIBUTE=STRENGTH"),
        ({"edit": "beard=1"}, 400, "no direction 'beard'"),
        ({"edit": "x" * 2001}, 422, "edit"),
        ({"prompt": "p" * 201}, 422, "prompt"),
        ({"prompt": ""}, 422, "prompt"),
    ],
)
def test_every_parameter_is_bounded_with_a_clear_4xx(hub, params, status, message):
    got, _, body = hub.png("toy-0", **params)
    assert got == status and message in body["error"], (params, got, body)


def test_models_that_cannot_be_drawn_and_names_that_are_not_models(hub):
    status, _, body = hub.png("stranger")
    assert status == 400 and "does not run base model" in body["error"] and "--render-base" in body["error"]
    for ref in ("nobody", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "0", "9" * 30):
        status, _, body = hub.png(ref)
        assert status == 404 and isinstance(body, dict), (ref, status, body)  # slashes: no route at all


def test_private_models_are_drawn_only_for_their_readers(hub):
    secret = hub.reg.get("alice.secret")
    assert secret.base_model == TOY_BASE_ID
    status, _, data = hub.png("alice.secret", token=ALICE, seed=2)
    assert status == 200 and np.array_equal(decode(data), drawn(hub.reg.lora(secret), 2, STEPS))
    for token in (None, BOB):
        for path in ("/api/w2w/models/{}/preview", PNG_PATH):
            a = hub.server.request("GET", path.format("alice.secret"), token=token)
            b = hub.server.request("GET", path.format("alice.ghost"), token=token)
            assert a[0] == b[0] == 404 and a[2]["error"].replace("secret", "ghost") == b[2]["error"], (token, path)
        # cached for alice: still missing for the others
        assert hub.png("alice.secret", token=token, seed=2)[0] == 404
    # alice's edit of her private model is as private as its parent, preview included
    body = {"model": "alice.secret", "directions": {"glasses": 1.0}, "name": "secret-edit"}
    assert hub.server.request("POST", "/api/w2w/edit", body, token=ALICE)[0] in (200, 400)  # 400: another space
    if "secret-edit" in {m.name for m in hub.reg.ls()}:
        assert hub.png("secret-edit", token=ALICE)[0] == 200
        assert hub.png("secret-edit", token=BOB)[0] == 404


def test_a_render_never_blocks_the_server_and_the_queue_is_bounded(hub):
    """While the renderer is taken (held here, as a long render would), other routes answer; a preview waits at
    most `wait_s`, and beyond `max_waiting` waiting previews the answer is a 503 at once."""
    gate = hub.previews.gate
    uncached = {"seed": 12345, "edit": "glasses=0.7"}
    with gate.turn():
        status, _, models = hub.server.get("/api/w2w/models")
        assert status == 200 and models["total"] >= 8  # the registry's lock is not the renderer's
        gate.wait_s, gate.max_waiting = 0.3, 1
        t0 = time.perf_counter()
        status, headers, body = hub.png("toy-4", **uncached)
        assert status == 503 and headers["retry-after"] == "1" and "retry" in body["error"]
        assert time.perf_counter() - t0 < 10
        gate.max_waiting = 0
        status, _, body = hub.png("toy-4", **uncached)
        assert status == 503 and "busy" in body["error"]
        assert hub.png("toy-1", seed=3)[0] == 200  # a cached image needs no turn
    gate.wait_s, gate.max_waiting = Limits.wait_s, Limits.max_waiting
    assert hub.png("toy-4", **uncached)[0] == 200


def test_while_a_base_model_loads_previews_answer_503_at_once(hub):
    """A base loads once (an SD model takes minutes): meanwhile a preview waits at most 2 s, then is told to retry."""
    previewer = Previewer()  # nothing loaded yet
    server = LiveServer(create_app(hub.reg, {ALICE: "alice"}, renderer=previewer))
    try:
        with previewer._loading:  # as while another request loads the base
            for path in ("/api/w2w/models/toy-0/preview", PNG_PATH.format("toy-0")):
                t0 = time.perf_counter()
                status, headers, body = server.get(path)
                assert status == 503 and "is loading" in body["error"], (path, status, body)
                assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"
                assert time.perf_counter() - t0 < 10
        deadline = time.monotonic() + 120
        while (answer := server.get("/api/w2w/models/toy-0/preview"))[0] == 503:  # the load, now let go
            assert time.monotonic() < deadline, answer
            time.sleep(0.5)
        assert answer[2]["available"]
    finally:
        server.stop()


def test_gate_and_cache_bounds():
    gate = Gate(max_waiting=1, wait_s=5)
    entered = threading.Event()
    release = threading.Event()

    def hold():
        with gate.turn():
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(10)
    waiter = threading.Thread(target=lambda: gate.turn().__enter__())  # waits for its turn
    waiter.start()
    deadline = time.monotonic() + 10
    while gate.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Busy, match="busy"), gate.turn():
        pass
    release.set()
    holder.join(10)
    waiter.join(10)

    cache = ImageCache(max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"1234")  # 12 bytes > 10: the least recent (b) goes
    assert cache.get("b") is None and cache.get("a") and cache.get("c") and cache.bytes == 8
    cache.put("big", b"x" * 11)  # larger than the whole cache: not kept
    assert cache.get("big") is None and len(cache) == 2
    assert parse_edit(" glasses=1 , smile=-0.5 ,", 5) == {"glasses": 1.0, "smile": -0.5}
    assert parse_edit(None, 5) == {} == parse_edit("", 5)


def test_a_configured_diffusers_base_draws_the_models_that_fit_it(tmp_path, tiny_base, tiny_layout):
    """`serve --render-base FOLDER`: models of that base draw on it (here an SD pipeline built in code), toy
    models still on the toy base, and a model that fits neither is refused."""
    reg = Registry.init(tmp_path / "reg")
    lora = random_lora(tiny_layout, seed=5, scale=0.5)
    reg.add_models(
        [
            NewModel.from_lora("sd-a", lora),
            NewModel.from_lora("toy-a", random_lora(TOY_LAYOUT, seed=1, scale=0.25), base_model=TOY_BASE_ID),
            # says it is of the toy base, but its modules are the SD pipeline's
            NewModel.from_lora("liar", random_lora(tiny_layout, seed=6, scale=0.5), base_model=TOY_BASE_ID),
        ]
    )
    previewer = Previewer(base_model=str(tiny_base))
    previewer.warm()
    assert set(previewer._bases) == {"toy", str(tiny_base)}
    server = LiveServer(create_app(reg, {ALICE: "alice"}, renderer=previewer))
    try:
        status, _, info = server.get("/api/w2w/models/sd-a/preview")
        assert status == 200 and info["available"] and info["size"] == 8 and info["base"] == str(tiny_base)
        status, _, data = server.get(PNG_PATH.format("sd-a"), steps=STEPS, seed=1)
        assert status == 200 and np.array_equal(decode(data), drawn(lora, 1, STEPS, str(tiny_base)))
        status, _, data = server.get(PNG_PATH.format("toy-a"), steps=STEPS)
        assert status == 200 and decode(data).shape == (32, 32, 3)
        status, _, body = server.get(PNG_PATH.format("liar"), steps=STEPS)
        assert status == 400 and "does not fit base model" in body["error"], body
    finally:
        server.stop()
    bare = LiveServer(create_app(reg, {ALICE: "alice"}))  # no renderer at all
    try:
        status, _, info = bare.get("/api/w2w/models/toy-a/preview")
        assert status == 200 and not info["available"] and "draws no previews" in info["reason"]
        assert bare.get(PNG_PATH.format("toy-a"))[0] == 400
    finally:
        bare.stop()


def test_serve_command_draws_previews_within_its_options(tmp_path):
    """`w2wreg serve --render-max-steps 10` in its own process: it starts without torch or any base model (a
    server that only moves files holds neither), loads the toy base at the first preview and draws."""
    import socket
    import subprocess
    import sys

    reg = Registry.init(tmp_path / "reg")
    reg.add_models([NewModel.from_lora("toy-a", random_lora(TOY_LAYOUT, seed=1, scale=0.25), base_model=TOY_BASE_ID)])
    del reg
    with socket.socket() as sock:  # a free port (released just before the server takes it)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--registry", tmp_path / "reg", "serve", "--port", port, "--token", ALICE, "--render-max-steps", "10"]
    log = (tmp_path / "serve.log").open("w")  # a file, not a pipe nobody reads
    proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], stdout=log, stderr=log)
    try:
        import http.client
        import json

        def get(path):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            return r.status, json.loads(body) if r.getheader("content-type") == "application/json" else body

        def torch_loaded() -> bool:  # what the process has mapped: torch's own library, once imported
            return "libtorch" in (Path("/proc") / str(proc.pid) / "maps").read_text()

        deadline = time.monotonic() + 120
        while True:
            try:
                status, _ = get("/api/w2w/models")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        assert not torch_loaded(), "serve loaded torch before any preview was asked for"
        while True:  # 503 + Retry-After while the toy base loads
            status, info = get("/api/w2w/models/toy-a/preview")
            if status == 200:
                break
            assert status == 503 and "is loading" in info["error"], (status, info)
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        assert torch_loaded()
        assert info["available"] and info["max_steps"] == 10 and info["steps"] == 10 and info["directions"] == []
        status, data = get(PNG_PATH.format("toy-a") + "?steps=4&seed=1")
        assert status == 200 and decode(data).shape == (32, 32, 3)
        status, body = get(PNG_PATH.format("toy-a") + "?steps=11")
        assert status == 422 and "steps" in body["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# --- the page, in Chromium ------------------------------------------------------------------------------


def data_url_png(url: str) -> bytes:
    head, _, payload = url.partition(",")
    assert head == "data:image/png;base64", head
    return base64.b64decode(payload)


@needs_chromium
def test_edit_panel_sliders_redraw_and_save_in_chromium(hub, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as driver:
        wait = WebDriverWait(driver, 60)
        driver.get(hub.server.url + "/#/model/toy-5")
        original = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#preview-original[src]")))
        assert data_url_png(original.get_attribute("src")) == hub.png("toy-5", seed=0, steps=20)[2]
        slider = driver.find_element(By.ID, "dir-glasses")
        assert float(slider.get_attribute("max")) == 5.0  # as far as the server renders (max_strength)
        assert driver.find_element(By.ID, "save-edit").get_attribute("disabled")  # nothing to save yet
        slider.send_keys(*[Keys.ARROW_RIGHT] * 8)  # eight steps of 0.1, as a user's keyboard moves it
        edited = driver.find_element(By.ID, "preview-edited")
        wait.until(lambda d: edited.get_attribute("data-edit") == "glasses=0.8")
        shown = data_url_png(edited.get_attribute("src"))
        assert shown == hub.png("toy-5", seed=0, steps=20, edit="glasses=0.8")[2]
        assert shown != data_url_png(original.get_attribute("src"))
        assert driver.find_element(By.CSS_SELECTOR, ".slider-row output").text == "0.8"

        # another seed redraws both images
        seed = driver.find_element(By.ID, "preview-seed")
        seed.clear()
        seed.send_keys("7", Keys.TAB)
        wait.until(lambda d: edited.get_attribute("data-seed") == "7" and original.get_attribute("data-seed") == "7")
        assert data_url_png(edited.get_attribute("src")) == hub.png("toy-5", seed=7, steps=20, edit="glasses=0.8")[2]

        # saving needs the token; with it, the edit is registered as an edit of toy-5
        driver.find_element(By.ID, "save-name").send_keys("toy-5-glasses")
        driver.find_element(By.ID, "save-edit").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "save-status"), "token"))
        assert "toy-5-glasses" not in {m.name for m in hub.reg.ls()}
        box = driver.find_element(By.ID, "token")
        box.send_keys(ALICE, Keys.TAB)  # leaving the box: its change event, once
        # the token's change re-opens the model: move the slider again, then save
        wait.until(ec.staleness_of(slider))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#preview-original[src]")))
        slider = driver.find_element(By.ID, "dir-glasses")
        slider.send_keys(*[Keys.ARROW_RIGHT] * 8)
        wait.until(lambda d: d.find_element(By.ID, "preview-edited").get_attribute("data-edit") == "glasses=0.8")
        driver.find_element(By.ID, "save-name").send_keys("toy-5-glasses")
        driver.find_element(By.ID, "save-edit").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#saved-name a")))
        new = hub.reg.get("toy-5-glasses")
        (step,) = hub.reg.catalog.lineage(new.id)
        assert (step["parent"], step["operation"], step["params"]["directions"]) == ("toy-5", "edit", {"glasses": 0.8})
        assert driver.save_screenshot(str(tmp_path / "edit-panel.png"))  # for a person: pytest --basetemp=DIR
        driver.find_element(By.CSS_SELECTOR, "#saved-name a").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "model-name"), "toy-5-glasses"))
        assert "edit" in driver.find_element(By.ID, "model").text


def test_no_previews_never_loads_torch_and_says_why(tmp_path):
    """`w2wreg serve --no-previews`: a model of the toy base (which a server draws by default) gets a clear
    "not here" (preview info: unavailable, with the reason; the image: a 400 naming the flag), and the
    server process never maps torch."""
    import http.client

    from served import ServeProcess

    reg = Registry.init(tmp_path / "reg")
    reg.add_models([NewModel.from_lora("toy-0", random_lora(TOY_LAYOUT, seed=0, scale=0.25), base_model=TOY_BASE_ID)])
    server = ServeProcess(tmp_path / "reg", ALICE, "--no-previews")
    try:
        for path, status in ((PNG_PATH.format("toy-0") + "?steps=1", 400), ("/api/w2w/models/toy-0/preview", 200)):
            c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            c.request("GET", path)
            resp = c.getresponse()
            body = resp.read().decode()
            assert resp.status == status and "--no-previews" in body, (path, resp.status, body)
        assert '"available":false' in body
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert "torch" not in maps, "the server loaded torch"
    finally:
        server.stop()
    for flag in (["--render-base", str(TOY_BASE_DIR)], ["--render-device", "cuda"]):  # a contradiction: said so
        out = run(tmp_path / "reg", "serve", "--no-previews", *flag, code=1).output
        assert "--no-previews draws nothing" in out, out
