"""The anytime server: started on a free port, real HTTP requests; answers equal predict's, a deadline that cannot be
met for the last step answers from an earlier exit within it, malformed requests get a 400 with one line."""

import dataclasses
import io
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

import cascadenet as cn
from cascadenet.evaluation.early_exit import predict
from cascadenet.runs.load import load_run

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from cascadenet.deployment.server import Scheduler, StepTimes, make_app  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app) -> tuple[str, "uvicorn.Server", threading.Thread]:
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", srv, thread


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(FIXTURE, run)
    model = cn.load_model(run)
    model.preprocess = dataclasses.replace(model.preprocess, size=(32, 32))  # a format-1 run does not record it
    scheduler = Scheduler(model, max_batch=16)
    # a deadline of ten minutes: a round may stop at an earlier step only when a share of it has passed, which a
    # loaded machine (threads of other tests holding the interpreter lock) must not reach
    port = free_port()
    config = uvicorn.Config(make_app(scheduler, default_deadline_ms=600_000), host="127.0.0.1", port=port,
                            log_level="warning")  # fmt: skip
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    images = load_run(run, device="cpu").data.images[:6]
    pngs = []
    for im in images:
        buffer = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    yield f"http://127.0.0.1:{port}", model, pngs
    srv.should_exit = True
    thread.join(timeout=10)
    scheduler.close()


def test_answers_equal_predict_and_concurrent_requests_are_batched(server):
    url, model, pngs = server
    x = model.preprocess(pngs)
    expected = predict(model, x)
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{url}/health").json()["status"] == "ok"
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda b: client.post(f"{url}/predict", content=b).json(), pngs))
    for i, a in enumerate(answers):
        k = int(expected.predictions[i])
        assert a["label"] == k and a["class"] == model.classes[k], (a, expected.steps.tolist())
        assert a["exit"] == int(expected.steps[i]) == model.num_steps - 1
        assert a["probability"] == pytest.approx(float(expected.confidence[i]), abs=1e-5)
        assert a["macs"] == int(expected.macs[i]) and a["deadline_met"] and a["ms"] <= a["deadline_ms"]


def test_a_deadline_too_short_for_the_last_step_answers_from_an_earlier_exit(server):
    url, model, pngs = server
    with httpx.Client(timeout=30) as client:
        a = client.post(f"{url}/predict", params={"deadline_ms": 0.001}, content=pngs[0]).json()
    # no step fits in a microsecond: the first informative exit, the best answer there is
    first = model.first_informative_exit
    with torch.no_grad():
        probs = model(model.preprocess(pngs[0]))[first, 0].softmax(-1)
    assert a["exit"] == first and a["label"] == int(probs.argmax())
    assert a["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert a["deadline_ms"] == pytest.approx(0.001)


def test_malformed_requests_get_a_400_with_one_line(server):
    url, _, pngs = server
    with httpx.Client(timeout=30) as client:
        for kwargs, message in [
            ({"content": b"not an image"}, "cannot read image"),
            ({"content": b""}, "empty"),
            ({"content": pngs[0], "params": {"deadline_ms": "soon"}}, "deadline_ms"),
            ({"content": pngs[0], "params": {"deadline_ms": "-5"}}, "positive"),
        ]:
            r = client.post(f"{url}/predict", **kwargs)
            assert r.status_code == 400, (kwargs, r.text)
            detail = r.json()["detail"]
            assert message in detail and "\n" not in detail, detail
        assert client.get(f"{url}/health").status_code == 200  # still serving


def test_requests_too_late_for_the_first_exit_get_a_503_at_once(server):
    _, model, pngs = server
    # every step believed to take a second: two requests of 100 ms in one round cannot get even the first exit
    times = StepTimes([1], [[1.0]] * model.num_steps)
    scheduler = Scheduler(model, step_times=times, start=False)
    url, srv, thread = start_server(make_app(scheduler))
    try:
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(2) as pool:
            post = lambda b: client.post(f"{url}/predict", params={"deadline_ms": 100}, content=b)  # noqa: E731
            futures = [pool.submit(post, b) for b in pngs[:2]]
            for _ in range(400):  # both queued: one round takes them together
                if scheduler._queue.qsize() == 2:
                    break
                time.sleep(0.01)
            assert scheduler.run_round() == 2
            answers = [f.result() for f in futures]
            assert [r.status_code for r in answers] == [503, 503]
            assert all("cannot be met" in r.json()["detail"] for r in answers)
            health = client.get(f"{url}/health").json()
            assert (health["shed"], health["missed"], health["answered"]) == (2, 2, 0)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
