"""The `serve` task (lit_jax/serve/): the session against the Reader, the JSON API over a real
uvicorn server (limits, errors, concurrency), and the page in headless Chromium.

The decoder is the tiny config's untrained one (random 4-layer model over SmolLM2's
tokenizer; its answers are nonsense but deterministic, which is all equality needs), and
the steering result a saved `control` result with large vectors at block 1. One server
serves the whole module.
"""

import concurrent.futures
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax.data import tokenize_read
from lit_jax.lit import control as C
from lit_jax.lit.read import each_token
from lit_jax.models.steering import Steering, dense_vectors
from lit_jax.serve import session as S
from lit_jax.serve.app import _Queue, _Busy, build_session, create_app, limits_of, steering_names
from tests.test_control import _save_untrained_decoder
from tests.trace_counter import count_traces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
DIALOG = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi there, how are you?"}]
TEXT = "The Golden Gate Bridge is in San Francisco."
LIMITS = dict(max_read_tokens=96, max_questions=4, max_new_tokens=8, steer_max_new_tokens=8, max_token_view=48)


def _save_steering(directory: str, decoder) -> None:
    """A saved `control` result (vectors method): large random vectors added after block 1."""
    d = decoder.cfg.hidden_size
    theta = {"vectors": np.random.default_rng(0).normal(size=(1, d)).astype(np.float32)}
    spec = C.ControlSpec("vectors", (1,), read_layer=2)
    steering = Steering(vectors=dense_vectors((1,), jnp.asarray(theta["vectors"] * 4.0), decoder.cfg.num_layers))
    C.save_steering(directory, C.ControlResult(theta, spec, {1: 4.0}, {}, {}, [], steering), {"steps": 0})


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from configs import serve

    workdir = str(tmp_path_factory.mktemp("decoder"))
    _save_untrained_decoder(workdir)
    config = serve.get_config()
    config.decoder = workdir
    from lit_jax import load_decoder

    steer_dir = str(tmp_path_factory.mktemp("control") / "gg_vectors")
    _save_steering(steer_dir, load_decoder(workdir))
    config.serve.steering = (f"gg={steer_dir}",)
    config.serve.update(LIMITS)
    return build_session(config)


@pytest.fixture(scope="module")
def reader(session):
    return session.decoder.reader(session.reader.sampling)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(session):
    """A real uvicorn serving the session on a free local port: its base URL."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(session, max_waiting=32), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def _post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=300, **kw)


# ----------------------------------------------------------------------------- the session


def test_session_answers_and_colours_as_the_reader_does(session, reader, monkeypatch):
    calls = []
    original = S.residual_stream
    monkeypatch.setattr(S, "residual_stream", lambda *a, **k: calls.append(1) or original(*a, **k))
    read = session.create_read({"dialog": DIALOG, "read_from_turn": 1})
    tokens, positions = tokenize_read(session.decoder.tokenizer, DIALOG, read_from_turn=1)
    assert [t["in_span"] for t in read["tokens"]] == [i in set(positions.tolist()) for i in range(len(tokens))]
    assert read["span"] == positions.tolist()
    questions = ["What persona will the assistant adopt?", "Is it a pirate?", "What is this about?"]
    got = session.ask({"read_id": read["read_id"], "questions": questions})
    assert [a["answer"] for a in got["answers"]] == reader.ask([(tokens, positions)] * 3, questions)
    p = int(positions[2])
    one = session.ask({"read_id": read["read_id"], "questions": ["What is this about?"], "token": p})
    assert one["answers"][0]["answer"] == reader.ask([(tokens, positions[2:3])], ["What is this about?"])[0]
    scores = session.token_scores({"read_id": read["read_id"], "question": "Is it a pirate?"})
    ref = reader.score(each_token((tokens, positions)), ["Is it a pirate?"] * len(positions),
                       [["Yes", "No"]] * len(positions))
    assert [s["index"] for s in scores["scores"]] == positions.tolist()
    np.testing.assert_allclose([s["p_yes"] for s in scores["scores"]],
                               [1 / (1 + np.exp(r[1] - r[0])) for r in ref], atol=1e-4)
    assert len(calls) == 1  # the target ran once for the read, then its cached stream served every request
    # a token range: span tokens [2, 5)
    ranged = session.create_read({"text": TEXT, "span_start": 2, "span_end": 5})
    t2, p2 = tokenize_read(session.decoder.tokenizer, TEXT)
    assert ranged["span"] == p2[2:5].tolist()
    assert (session.ask({"read_id": ranged["read_id"], "questions": ["What is this about?"]})["answers"][0]["answer"]
            == reader.ask([(t2, p2[2:5])], ["What is this about?"])[0])


def _save_multilayer_decoder(workdir: str) -> None:
    """An untrained tiny decoder reading layers 1 and 2 at once (oracle prompt; written as the tiny config writes)."""
    import jax

    from configs import tiny
    from lit_jax.lit.checkpoint import Checkpointer
    from lit_jax.lit.job import load_model, run_meta
    from lit_jax.lit.train_state import init_state, init_trainable, make_optimizer
    from lit_jax.lit.trained import save_run_settings
    from lit_jax.settings import lit_from_section

    config = tiny.get_config()
    config.data.prompt_style, config.data.read_layers, config.data.read_all_layers = "oracle", (1, 2), True
    cfg, base, tok = load_model(config.model, config.seed)
    lcfg = lit_from_section(config.lit, config.data.read_layers)
    save_run_settings(workdir, config, tok)
    state = init_state(init_trainable(jax.random.key(0), cfg, lcfg, base), make_optimizer(1e-3, 0, 1))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(0, state, {}, run_meta(cfg, lcfg, config.data, tok))
    ckpt.close()


def test_a_decoder_reading_several_layers_at_once(tmp_path):
    from lit_jax import load_decoder

    _save_multilayer_decoder(str(tmp_path))
    decoder = load_decoder(str(tmp_path))
    session = S.Session(decoder, {}, S.Limits(max_new_tokens=6))
    reader = decoder.reader(session.reader.sampling)
    assert session.info()["read_all_layers"] and session.info()["read_layers"] == [1, 2]
    read = session.create_read({"text": TEXT, "span_start": 1, "span_end": 6})
    tokens, positions = tokenize_read(decoder.tokenizer, TEXT)
    got = session.ask({"read_id": read["read_id"], "questions": ["What is this about?", "Where?"]})
    assert [a["answer"] for a in got["answers"]] == reader.ask([(tokens, positions[1:6])] * 2,
                                                               ["What is this about?", "Where?"])
    scores = session.token_scores({"read_id": read["read_id"], "question": "Is it a bridge?"})
    ref = reader.score(each_token((tokens, positions[1:6])), ["Is it a bridge?"] * 5, [["Yes", "No"]] * 5)
    np.testing.assert_allclose([s["p_yes"] for s in scores["scores"]], [1 / (1 + np.exp(r[1] - r[0])) for r in ref],
                               atol=1e-4)
    with pytest.raises(S.RequestError, match="all of"):
        session.ask({"read_id": read["read_id"], "questions": ["q"], "layer": 1})


def test_later_requests_reuse_the_compiled_shapes(session):
    first = session.create_read({"text": "A short text about boats."})
    session.ask({"read_id": first["read_id"], "questions": ["What is this about?", "Why?"]})
    session.token_scores({"read_id": first["read_id"], "question": "Is it about boats?"})
    with count_traces() as traces:
        other = session.create_read({"text": "A long story about trains."})  # other tokens, same buckets
        session.ask({"read_id": other["read_id"], "questions": ["Where?", "What is the topic here?"]})
        session.token_scores({"read_id": other["read_id"], "question": "Is it about trains?"})
    assert first["tokens"] != other["tokens"]
    compiled = {k: v for k, v in traces.items() if k in ("residual_stream", "answer_from_stream",
                                                         "logprob_from_stream", "generate_tokens")}
    assert not compiled, dict(traces)


def test_session_refuses_bad_requests_by_field(session):
    read = session.create_read({"text": TEXT})["read_id"]
    cases = [
        ({}, "create_read", "dialog"),
        ({"text": "x", "dialog": DIALOG}, "create_read", "dialog"),
        ({"text": "word " * 200}, "create_read", "text"),  # over max_read_tokens
        ({"dialog": [{"role": "robot", "content": "hi"}]}, "create_read", "dialog[0].role"),
        ({"dialog": DIALOG, "read_from_turn": 5}, "create_read", "read_from_turn"),
        ({"text": TEXT, "span_start": 50}, "create_read", "span_start"),
        ({"read_id": "nope", "questions": ["q"]}, "ask", "read_id"),
        ({"read_id": read, "questions": []}, "ask", "questions"),
        ({"read_id": read, "questions": ["q"] * 5}, "ask", "questions"),
        ({"read_id": read, "questions": ["x" * 600]}, "ask", "questions[0]"),
        ({"read_id": read, "questions": ["q"], "layer": 1}, "ask", "layer"),
        ({"read_id": read, "questions": ["q"], "token": 999}, "ask", "token"),
        ({"read_id": read, "questions": "q"}, "ask", "questions"),
        ({"read_id": read}, "token_scores", "question"),
        ({"prompt": "hi", "steering": "other"}, "steer", "steering"),
        ({"prompt": "x" * 3000, "steering": "gg"}, "steer", "prompt"),
    ]
    for req, method, field in cases:
        with pytest.raises(S.RequestError) as e:
            getattr(session, method)(req)
        assert e.value.field == field, (req, str(e.value))
    with pytest.raises(S.RequestError, match="max_read_tokens=96"):
        session.create_read({"text": "word " * 200})


def test_info_shows_the_decoder_settings(session):
    info = session.info()
    assert info["base_model"] == "random" and info["read_layers"] == [2] and info["write_mode"] == "replace"
    assert info["training_steps"] == 30 and info["checkpoint_step"] == 0 and info["lora"]["rank"] == 4
    assert list(info["steering"]) == ["gg"] and info["steering"]["gg"]["method"] == "vectors"
    assert info["limits"]["max_read_tokens"] == 96


def test_steering_names_and_queue_limit():
    assert steering_names(["a/b/gg_vectors", "x=c/d"]) == {"gg_vectors": "a/b/gg_vectors", "x": "c/d"}
    with pytest.raises(ValueError, match="given twice"):
        steering_names(["a/gg", "b/gg"])
    from configs import serve

    config = serve.get_config()
    config.serve.max_questions = 0
    with pytest.raises(ValueError, match="--config.serve.max_questions=0"):
        limits_of(config.serve)
    q = _Queue(1)
    with q:
        with pytest.raises(_Busy):
            with q:
                pass
    with q:
        pass  # the slot is free again


# ----------------------------------------------------------------------------- the JSON API


def test_api_read_ask_colour_steer(server, session):
    page = httpx.get(server + "/", timeout=30)
    assert page.status_code == 200 and "app.js" in page.text
    assert httpx.get(server + "/static/app.js", timeout=30).status_code == 200
    info = httpx.get(server + "/api/info", timeout=30).json()
    assert info["read_layers"] == [2] and info["limits"]["max_waiting"] > 0
    read = _post(server, "/api/read", {"dialog": DIALOG, "read_from_turn": 1}).json()
    got = _post(server, "/api/ask", {"read_id": read["read_id"], "questions": ["Who?", "Why?"]}).json()
    assert [a["question"] for a in got["answers"]] == ["Who?", "Why?"]
    direct = session.ask({"read_id": read["read_id"], "questions": ["Who?", "Why?"]})
    assert got["answers"] == direct["answers"]
    scores = _post(server, "/api/token_scores", {"read_id": read["read_id"], "question": "Pirate?"}).json()
    assert len(scores["scores"]) == len(read["span"]) and all(0 < s["p_yes"] < 1 for s in scores["scores"])
    steer = _post(server, "/api/steer", {"prompt": "Tell me a story.", "steering": "gg"}).json()
    assert steer["plain"] != steer["steered"]


def test_api_errors_name_the_field(server):
    r = _post(server, "/api/read", {"text": "word " * 200})
    assert r.status_code == 400 and r.json()["field"] == "text" and "max_read_tokens=96" in r.json()["error"]
    r = _post(server, "/api/ask", {"read_id": "nope", "questions": ["q"]})
    assert r.status_code == 400 and r.json()["field"] == "read_id"
    r = httpx.post(server + "/api/ask", content=b"not json", headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["field"] == "body" and "not valid JSON" in r.json()["error"]
    # `curl -d '{...}'` (the README's examples) labels the JSON as a form: it is read as JSON all the same
    r = httpx.post(server + "/api/read", content=b'{"text": "The sea is calm."}',
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 200 and r.json()["read_id"]
    r = _post(server, "/api/ask", ["a", "list"])
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = _post(server, "/api/steer", {"prompt": "hi", "steering": "../../etc"})
    assert r.status_code == 400 and "not loaded" in r.json()["error"]


def test_api_concurrent_requests_are_all_answered(server, reader, session):
    """20 requests, 4 at a time, on the loopback address: each answered, equal to the Python API's
    (Reader.ask on the same read), a refused one among them disturbing none."""
    read = _post(server, "/api/read", {"text": TEXT}).json()
    tokens, positions = tokenize_read(session.decoder.tokenizer, TEXT)
    asks = [([f"Question number {i}?"], None if i % 2 else int(positions[i % len(positions)])) for i in range(19)]
    bodies = [("/api/ask", {"read_id": read["read_id"], "questions": q, **({} if t is None else {"token": t})})
              for q, t in asks]
    bodies.insert(7, ("/api/ask", {"read_id": read["read_id"], "questions": ["x" * 900]}))  # refused
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: _post(server, *b), bodies))
    assert replies[7].status_code == 400 and replies[7].json()["field"] == "questions[0]"
    del replies[7]
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    expected = [reader.ask([(tokens, positions if t is None else np.asarray([t], np.int32))], q)[0] for q, t in asks]
    assert [r.json()["answers"][0]["answer"] for r in replies] == expected
    assert len(set(expected)) > 1  # the token reads differ from the whole span's


def test_a_model_error_is_reported_and_the_server_keeps_serving(server, session, monkeypatch):
    def broken(req):
        raise RuntimeError("XLA out of memory (simulated)")

    read = _post(server, "/api/read", {"text": TEXT}).json()["read_id"]
    monkeypatch.setattr(session, "ask", broken)
    r = _post(server, "/api/ask", {"read_id": read, "questions": ["q"]})
    assert r.status_code == 500 and "model error" in r.json()["error"] and "simulated" in r.json()["error"]
    monkeypatch.undo()
    r = _post(server, "/api/ask", {"read_id": read, "questions": ["q"]})
    assert r.status_code == 200 and len(r.json()["answers"]) == 1
    assert not session.lock.locked()


def test_serve_task_refuses_a_missing_decoder():
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/serve.py"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--config.decoder is empty" in r.stderr


# ----------------------------------------------------------------------------- the page in Chromium


@pytest.fixture(scope="module")
def browser(server):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("LIT_JAX_REQUIRE_BROWSER"):  # CI installs them: missing there is a failure
            pytest.fail("LIT_JAX_REQUIRE_BROWSER is set but chromium / chromedriver are not installed")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1300,1250"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(server + "/")
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def _by(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def _set(driver, element_id, value):
    el = _by(driver, "#" + element_id)[0]
    el.clear()
    el.send_keys(value)


def _text_mode(driver, text, questions):
    _by(driver, "#mode-text")[0].click()
    _set(driver, "text", text)
    _set(driver, "questions", questions)


def _idle(driver):
    return _wait(driver, lambda d: not _by(d, "#busy")[0].is_displayed())


def test_page_asks_and_shows_the_answers(browser, server, session):
    _wait(browser, lambda d: len(_by(d, "#info tr")) > 0 and _by(d, "#layer option"))
    assert "random" in _by(browser, "#info")[0].text and "replace" in _by(browser, "#info")[0].text
    _text_mode(browser, TEXT, "What is this about?\nIs it a bridge?")
    _by(browser, "#ask-btn")[0].click()
    _wait(browser, lambda d: len(_by(d, "#answers li")) == 2)
    read = session.create_read({"text": TEXT})
    expected = session.ask({"read_id": read["read_id"], "questions": ["What is this about?", "Is it a bridge?"]})
    shown = [li.find_element("css selector", ".answer").text for li in _by(browser, "#answers li")]
    assert shown == [a["answer"] or "(empty answer)" for a in expected["answers"]]
    assert not _by(browser, "#error")[0].is_displayed()
    # the read as tokens: one cell per token, the span's cells marked
    assert len(_by(browser, "#tokens .tok")) == len(read["tokens"])
    assert len(_by(browser, "#tokens .tok.span")) == len(read["span"])


def test_page_colours_one_cell_per_read_token_and_asks_about_a_clicked_token(browser, session):
    _text_mode(browser, TEXT, "What is this about?")
    _set(browser, "yesno-question", "Is it about a bridge?")
    _by(browser, "#colour-btn")[0].click()
    read = session.create_read({"text": TEXT})
    _wait(browser, lambda d: len(_by(d, "#tokens .tok.scored")) > 0)
    cells = _by(browser, "#tokens .tok.scored")
    scores = session.token_scores({"read_id": read["read_id"], "question": "Is it about a bridge?"})["scores"]
    assert len(cells) == len(read["span"]) == len(scores)
    assert [int(c.get_attribute("data-index")) for c in cells] == read["span"]
    np.testing.assert_allclose([float(c.get_attribute("data-p")) for c in cells], [s["p_yes"] for s in scores],
                               atol=1e-3)
    assert all(c.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "") for c in cells)
    assert not _by(browser, "#tokens .tok:not(.span).scored")  # only read tokens are coloured
    cells[3].click()
    _wait(browser, lambda d: _by(d, "#token-ask")[0].is_displayed())
    _set(browser, "token-question", "What is this about?")
    _by(browser, "#token-ask-btn")[0].click()
    _wait(browser, lambda d: _by(d, "#token-answer")[0].text != "")
    one = session.ask({"read_id": read["read_id"], "questions": ["What is this about?"], "token": read["span"][3]})
    assert _by(browser, "#token-answer")[0].text == (one["answers"][0]["answer"] or "(empty answer)")


def test_page_compares_steered_generations(browser, session):
    _wait(browser, lambda d: _by(d, "#steering option") and _by(d, "#steering")[0].get_attribute("value") == "gg")
    _set(browser, "steer-prompt", "Tell me a story.")
    _by(browser, "#steer-btn")[0].click()
    _wait(browser, lambda d: _by(d, "#plain")[0].text and _by(d, "#steered")[0].text)
    expected = session.steer({"prompt": "Tell me a story.", "steering": "gg"})
    plain, steered = _by(browser, "#plain")[0].text, _by(browser, "#steered")[0].text
    assert (plain, steered) == (expected["plain"] or "(empty)", expected["steered"] or "(empty)")
    assert plain != steered


def test_page_shows_an_error_and_keeps_working(browser, session, monkeypatch):
    _text_mode(browser, "word " * 200, "What is this about?")
    _by(browser, "#ask-btn")[0].click()
    _wait(browser, lambda d: _by(d, "#error")[0].is_displayed())
    assert "max_read_tokens=96" in _by(browser, "#error")[0].text and "text" in _by(browser, "#error")[0].text
    _idle(browser)
    # a slow request shows the progress indicator; then the page answers again
    original = session.ask
    monkeypatch.setattr(session, "ask", lambda req: time.sleep(1.5) or original(req))
    _text_mode(browser, TEXT, "What is this about?")
    _by(browser, "#ask-btn")[0].click()
    _wait(browser, lambda d: _by(d, "#busy")[0].is_displayed(), timeout=10)
    _wait(browser, lambda d: len(_by(d, "#answers li")) == 1 and not _by(d, "#busy")[0].is_displayed())
    assert not _by(browser, "#error")[0].is_displayed()
    shot = os.environ.get("LIT_SERVE_SCREENSHOT")
    if shot:  # README's docs/serve.png: LIT_SERVE_SCREENSHOT=docs/serve.png pytest tests/test_serve.py
        _by(browser, "#colour-btn")[0].click()
        _wait(browser, lambda d: len(_by(d, "#tokens .tok.scored")) > 0)
        _idle(browser)
        browser.save_screenshot(shot)
