"""Bearer-token auth: a second Serve app whose replicas read the token from an env var."""

import os
from collections.abc import Iterator

import pytest
import requests

from tests.runs import write_run
from tests.serve.conftest import encode, scene, serving

pytestmark = pytest.mark.slow  # Ray and Serve start-up

TOKEN_ENV = "MASKDISTILL_TEST_SERVE_TOKEN"
TOKEN = "s3cret-t0ken"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run = write_run(tmp_path_factory.mktemp("run_without_detector"))
    # set before ray.init: the replicas' worker processes inherit the driver's environment
    os.environ[TOKEN_ENV] = TOKEN
    try:
        with serving(run, {"auth_token_env": TOKEN_ENV}) as base:
            yield base
    finally:
        del os.environ[TOKEN_ENV]


def segment(url: str, headers: dict[str, str], route: str = "segment") -> requests.Response:
    headers = {"Content-Type": "image/png", **headers}
    return requests.post(f"{url}/{route}", data=encode(scene(0)), headers=headers)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "not bearer"],
)
def test_requests_without_the_token_get_401(url: str, headers: dict[str, str]) -> None:
    instances = segment(url, headers, route="instances")
    for response in (
        segment(url, headers),
        requests.get(f"{url}/classes", headers=headers),
        instances,
    ):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in response.json()["error"]


def test_the_token_opens_segment_and_classes(url: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = segment(url, auth)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert requests.get(f"{url}/classes", headers=auth).status_code == 200


def test_health_and_docs_stay_open(url: str) -> None:
    assert requests.get(f"{url}/healthz").status_code == 200
    assert requests.get(f"{url}/openapi.json").status_code == 200


def test_a_run_without_a_detector_answers_404_on_instances(url: str) -> None:
    response = segment(url, {"Authorization": f"Bearer {TOKEN}"}, route="instances")
    assert response.status_code == 404
    assert "no trained detector" in response.json()["error"]
