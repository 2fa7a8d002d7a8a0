"""The explorer's HTTP side over real sockets on 127.0.0.1: its files, its JSON endpoint, and
bad requests answered with a clear error while the server keeps serving."""

import http.client
import json
import re
import threading

import numpy as np
import pytest

from jaxlens.lens import LogitLens
from jaxlens.models import load_model
from jaxlens.serve.explorer import Explorer
from jaxlens.serve.page import STATIC_FILES, static_file
from jaxlens.serve.server import make_server
from jaxlens.trajectory_lib import PredictionTrajectory

TEXT = "Now is the winter of our discontent"


@pytest.fixture(scope="module")
def model(tiny_lm):
    return load_model(tiny_lm)


@pytest.fixture(scope="module")
def address(model):
    server = make_server(Explorer(model, None), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[:2]
    server.shutdown()
    server.server_close()


def _request(address, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection(*address, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers=headers or {})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response, payload


def _view(address, body):
    response, payload = _request(address, "POST", "/api/view", body)
    return response.status, json.loads(payload)


def test_the_page_and_its_files(address):
    response, page = _request(address, "GET", "/")
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")
    # The page names only its own files: nothing to fetch from elsewhere.
    assert set(re.findall(rb'(?:src|href)="([^"]+)"', page)) == {
        b"/static/style.css",
        b"/static/heatmap.css",
        b"/static/heatmap.js",
        b"/static/app.js",
    }
    for name, content_type in STATIC_FILES.items():
        response, data = _request(address, "GET", f"/static/{name}")
        assert response.status == 200 and response.getheader("Content-Type") == content_type
        assert data == static_file(name) and not re.search(rb"https?://", data), name
    assert _request(address, "GET", "/static/../server.py")[0].status == 404


def test_info(address, model):
    response, payload = _request(address, "GET", "/api/info")
    info = json.loads(payload)
    assert response.status == 200
    assert info["num_layers"] == model.num_layers and info["token_limit"] == 64
    assert info["lenses"] == ["logit"] and len(info["statistics"]) == 5


def test_a_view_is_the_trajectory(address, model):
    status, view = _view(address, {"text": TEXT, "lens": "logit", "statistic": "entropy"})
    reference = PredictionTrajectory.from_lens(LogitLens(model.decoder()), model, TEXT)
    assert status == 200
    assert (
        view["top_tokens"] == reference.token_strings(reference.log_probs_ltv.argmax(-1)).tolist()
    )
    np.testing.assert_allclose(view["values"], reference.entropy().values_lt, atol=2e-4)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": ""}, "The text is empty; type some text to look at."),
        ({"text": "word" + " word" * 79}, "The text is 80 tokens long; at most 64 fit"),
        ({"text": TEXT, "statistic": "perplexity"}, "Unknown statistic 'perplexity'"),
        ({"text": TEXT, "lens": "tuned"}, "Unknown lens 'tuned'"),
        ({"text": TEXT, "layers": [0]}, "layers must be [first, last]"),
        ({"text": TEXT, "colour": "red"}, "Unknown fields ['colour']"),
        ({"text": 3}, "The text is empty"),
        (["not", "an", "object"], 'Send a JSON object with a "text" field.'),
        (b"{not json", "The request is not JSON"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_server_goes_on(address, body, message):
    status, answer = _view(address, body)
    assert status == 400 and answer["error"].startswith(message), answer
    status, view = _view(address, {"text": TEXT})
    assert status == 200 and view["num_tokens"] == len(view["tokens"]) > 0


def test_unknown_paths(address):
    assert _request(address, "GET", "/nothing")[0].status == 404
    assert _request(address, "POST", "/api/other", b"{}")[0].status == 404
