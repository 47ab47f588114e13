"""The serving API over a real trained model, without Ray: every malformed request gets a 4xx."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from keel import __version__
from keel.data.contract import DataContract
from keel.data.transform import FeatureTransform
from keel.predictor import Predictor
from keel.serve.app import build_app
from keel.serve.canary import CanaryAnswer, CanaryCall, CanaryMetrics, CanaryRouter, ForwardedRequest, answer_in_process
from keel.serve.challenger import CANARY_APP
from keel.serve.config import CanaryConfig
from keel.serve.schema import record_model
from keel.settings import KeelSettings
from tests.conftest import SMALL_CONTRACT, small_frame
from tests.stages import run_stages, write_small_source

NAME, VERSION = "small-model", "3"


TOKEN = "s3cr3t-serving-token"


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    directory = tmp_path_factory.mktemp("serve")
    settings = KeelSettings(home=directory / ".keel")
    uris = run_stages(settings, "serve", write_small_source(directory))
    return Predictor.load(Path(uris["train"]))


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> TestClient:
    return TestClient(build_app(predictor, NAME, VERSION))


@pytest.fixture(scope="module")
def guarded(predictor: Predictor) -> TestClient:
    return TestClient(build_app(predictor, NAME, VERSION, token=TOKEN))


@pytest.mark.parametrize("headers, reason", [
    ({}, "missing bearer token"),
    ({"authorization": f"Basic {TOKEN}"}, "missing bearer token"),
    ({"authorization": "Bearer"}, "missing bearer token"),
    ({"authorization": "Bearer wrong-token"}, "invalid bearer token"),
    ({"authorization": f"Bearer {TOKEN}x"}, "invalid bearer token"),
])
def test_without_the_token_every_model_route_is_401(guarded: TestClient, headers: dict, reason: str) -> None:
    for method, path, body in [("post", f"/v1/models/{NAME}:predict", {"records": records(1)}),
                               ("get", f"/v2/models/{NAME}", None), ("get", "/openapi.json", None)]:
        response = guarded.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (path, response.text)
        message = response.json().get("detail") or response.json()["error"]  # v2 routes answer {"error": ...}
        assert reason in message and response.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in response.text


def test_with_the_token_requests_are_served_and_probes_stay_open(guarded: TestClient) -> None:
    response = guarded.post(f"/v1/models/{NAME}:predict", json={"records": records(2)},
                            headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
        assert guarded.get(path).status_code == 200, path
    assert 'code="401"' in guarded.get("/metrics").text  # refusals are counted like any answer


def test_a_required_token_that_is_not_set_fails_before_serving(tmp_path: Path) -> None:
    from keel.errors import ConfigError
    from keel.serve.deployment import serving_token

    with pytest.raises(ConfigError, match="KEEL_SERVE_TOKEN is empty"):
        serving_token(KeelSettings(home=tmp_path), require_token=True)
    assert serving_token(KeelSettings(home=tmp_path, serve_token=TOKEN), require_token=True) == TOKEN
    assert serving_token(KeelSettings(home=tmp_path, serve_token=TOKEN), require_token=False) == ""


def records(rows: int = 3) -> list[dict]:
    return small_frame(rows).drop(columns=["outcome"]).to_dict(orient="records")


def assert_still_serving(client: TestClient) -> None:
    response = client.post(f"/v1/models/{NAME}:predict", json={"records": records(2)})
    assert response.status_code == 200, response.text


def test_predict_returns_labels_probabilities_and_identity(client: TestClient) -> None:
    response = client.post(f"/v1/models/{NAME}:predict", json={"records": records(3)},
                           headers={"x-request-id": "req-1"})
    assert response.status_code == 200
    body = response.json()
    assert body["model_name"] == NAME and body["model_version"] == VERSION and body["request_id"] == "req-1"
    assert response.headers["x-model-version"] == VERSION and response.headers["x-request-id"] == "req-1"
    assert len(body["predictions"]) == 3
    for prediction in body["predictions"]:
        assert prediction["label"] in ("yes", "no")
        assert sum(prediction["probabilities"].values()) == pytest.approx(1, abs=1e-5)


def test_kserve_v1_instances_are_read_as_records(client: TestClient) -> None:
    """KServe's V1 protocol and MLflow's scoring server send rows as `instances`: the same answer, and errors
    name the key that was sent."""
    rows = records(3)
    as_records = client.post(f"/v1/models/{NAME}:predict", json={"records": rows}).json()["predictions"]
    as_instances = client.post(f"/v1/models/{NAME}:predict", json={"instances": rows})
    assert as_instances.status_code == 200 and as_instances.json()["predictions"] == as_records
    wrong = client.post(f"/v1/models/{NAME}:predict", json={"instances": [{**rows[0], "size": "big"}]})
    assert wrong.status_code == 422 and "instances.0.size" in wrong.json()["detail"]
    both = client.post(f"/v1/models/{NAME}:predict", json={"records": rows, "instances": rows})
    assert both.status_code == 422 and "instances: Extra inputs are not permitted" in both.json()["detail"]


def test_nulls_are_imputed(client: TestClient) -> None:
    record = {**records(1)[0], "weight": None, "colour": None}
    assert client.post(f"/v1/models/{NAME}:predict", json={"records": [record]}).status_code == 200


BAD_V1 = [
    ("not json", 400, "not valid JSON"),
    ({"records": []}, 422, "records"),
    ({"rows": records(1)}, 422, "rows"),
    ({"records": [{k: v for k, v in records(1)[0].items() if k != "size"}]}, 422, "records.0.size: Field required"),
    ({"records": [{**records(1)[0], "height": 1}]}, 422, "records.0.height: Extra inputs"),
    ({"records": [{**records(1)[0], "size": "big"}]}, 422, "records.0.size"),
    ({"records": [{**records(1)[0], "size": [1, 2]}]}, 422, "records.0.size"),
    ({"records": [{**records(1)[0], "colour": 5}]}, 422, "records.0.colour"),
    ({"records": "everything"}, 422, "records"),
]


@pytest.mark.parametrize("payload, status, message", BAD_V1)
def test_malformed_predict_requests_get_4xx_naming_the_field(client: TestClient, payload, status: int,
                                                             message: str) -> None:
    if isinstance(payload, str):
        response = client.post(f"/v1/models/{NAME}:predict", content=payload,
                               headers={"content-type": "application/json"})
    else:
        response = client.post(f"/v1/models/{NAME}:predict", json=payload)
    assert response.status_code == status and message in response.json()["detail"], response.text
    assert_still_serving(client)


@pytest.mark.parametrize("content_type, status", [
    ("application/x-www-form-urlencoded", 415), ("text/plain; charset=utf-8", 415),
    ("application/json; charset=utf-8", 200), ("application/vnd.api+json", 200), (None, 415)])
def test_a_json_body_sent_under_another_content_type_is_415_naming_the_header(client: TestClient,
                                                                               content_type: str | None,
                                                                               status: int) -> None:
    """`curl -d` without `-H` sends a form type, and `requests.post(url, data=...)` none: FastAPI then leaves
    the JSON unparsed, and the body read as "not a valid dictionary" (422) sent people looking for a fault in
    JSON that had none."""
    body = json.dumps({"records": records(1)})
    for path, key in ((f"/v1/models/{NAME}:predict", "detail"), (f"/v2/models/{NAME}/infer", "error")):
        payload = body if key == "detail" else json.dumps({"inputs": _v2_inputs(1)})
        headers = {} if content_type is None else {"content-type": content_type}
        response = client.post(path, content=payload, headers=headers)
        assert response.status_code == status, response.text
        if status == 415:
            sent = f"as {content_type!r}" if content_type else "without a content type"
            assert response.json()[key] == (f"the body was sent {sent}; send JSON, with the header "
                                             "'content-type: application/json'")
    assert_still_serving(client)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected(client: TestClient, literal: str) -> None:
    body = '{"records": [{"size": %s, "weight": 1.0, "colour": "red"}]}' % literal
    response = client.post(f"/v1/models/{NAME}:predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "records.0.size" in response.json()["detail"]
    assert_still_serving(client)


def test_numbers_too_large_for_the_network_are_rejected_not_answered_with_nulls(client: TestClient) -> None:
    """1e300 is a finite JSON number, but infinite in float32: the answer would be a NaN probability."""
    response = client.post(f"/v1/models/{NAME}:predict", json={"records": [{**records(1)[0], "weight": -1e300}]})
    assert response.status_code == 422, response.text
    assert "column 'weight': 1 value(s) are too large to score" in response.json()["detail"]
    v2 = _v2_inputs(2)
    v2[0]["data"] = [1e39, 1.0]
    response = client.post(f"/v2/models/{NAME}/infer", json={"inputs": v2})
    assert response.status_code == 422 and "column 'size'" in response.json()["error"], response.text
    assert_still_serving(client)


def test_unknown_model_is_404(client: TestClient) -> None:
    response = client.post("/v1/models/other:predict", json={"records": records(1)})
    assert response.status_code == 404 and "unknown model 'other'" in response.json()["detail"]
    assert client.get("/v2/models/other").json() == {"error": "unknown model 'other'; this server serves 'small-model'",
                                                     "model_name": NAME, "model_version": VERSION}


@pytest.mark.parametrize("path, body", [("/v1/models/other:predict", {"records": [{"text": "not this model's"}]}),
                                        ("/v2/models/other/infer", {"inputs": "not a list"})])
def test_a_request_to_another_model_hears_so_before_what_its_body_lacks(client: TestClient, path: str,
                                                                        body: dict) -> None:
    """Its body was meant for that other model: this one's missing fields would send the caller the wrong way."""
    response = client.post(path, json=body)
    assert response.status_code == 404, response.text
    assert "unknown model 'other'; this server serves 'small-model'" in response.text


def test_oversized_payload_is_413(client: TestClient) -> None:
    response = client.post(f"/v1/models/{NAME}:predict", content=b"{" + b" " * (2 << 20) + b"}",
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert_still_serving(client)


def test_too_many_records_is_422(client: TestClient) -> None:
    response = client.post(f"/v1/models/{NAME}:predict", json={"records": records(1) * 1025})
    assert response.status_code == 422 and "records" in response.json()["detail"]


def _v2_inputs(rows: int = 2) -> list[dict]:
    frame = small_frame(rows)
    return [{"name": "size", "shape": [rows], "datatype": "FP64", "data": frame["size"].tolist()},
            {"name": "weight", "shape": [rows, 1], "datatype": "FP64", "data": frame["weight"].tolist()},
            {"name": "colour", "shape": [rows], "datatype": "BYTES", "data": frame["colour"].tolist()}]


def test_open_inference_protocol(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{NAME}/ready").json()["ready"] is True
    metadata = client.get(f"/v2/models/{NAME}").json()
    assert metadata["versions"] == [VERSION] and {i["name"] for i in metadata["inputs"]} == {"size", "weight", "colour"}
    response = client.post(f"/v2/models/{NAME}/infer", json={"id": "abc", "inputs": _v2_inputs(2)})
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert response.json()["id"] == "abc" and outputs["label"]["shape"] == [2]
    assert outputs["probabilities"]["shape"] == [2, 2] and len(outputs["probabilities"]["data"]) == 4


@pytest.mark.parametrize("change, message", [
    (lambda i: i[:2], "missing input(s) ['colour']"),
    (lambda i: [*i, {"name": "height", "shape": [2], "datatype": "FP64", "data": [1, 2]}], "'height' is not a model input"),
    (lambda i: [{**i[0], "shape": [3]}, *i[1:]], "does not match"),
    (lambda i: [{**i[0], "shape": [2, 2]}, *i[1:]], "must be [N] or [N, 1]"),
    (lambda i: [{**i[0], "datatype": "COMPLEX"}, *i[1:]], "unsupported datatype"),
    (lambda i: [{**i[0], "data": ["a", "b"]}, *i[1:]], "column 'size'"),
])
def test_malformed_v2_requests_get_an_error_body(client: TestClient, change, message: str) -> None:
    response = client.post(f"/v2/models/{NAME}/infer", json={"inputs": change(_v2_inputs(2))})
    assert 400 <= response.status_code < 500 and message in response.json()["error"], response.text
    assert_still_serving(client)


def test_a_kserve_v1_client_lists_the_model_and_hears_it_is_ready(client: TestClient) -> None:
    assert client.get("/v1/models").json() == {"models": [NAME]}
    assert client.get(f"/v1/models/{NAME}").json() == {"name": NAME, "ready": True}
    response = client.get("/v1/models/other")
    assert response.status_code == 404 and "unknown model 'other'" in response.json()["detail"]
    assert client.get("/v2").json() == {"name": "keel", "version": __version__, "extensions": []}


def test_a_readiness_probe_is_not_counted_as_a_prediction(predictor: Predictor) -> None:
    """Alerts and dashboards read the scoring route's request rate as traffic: a probe every few seconds
    counted there would hide a model nobody calls."""
    client = TestClient(build_app(predictor, NAME, VERSION))
    for _ in range(3):
        client.get(f"/v1/models/{NAME}")
    client.post(f"/v1/models/{NAME}:predict", json={"records": records(1)})
    text = client.get("/metrics").text
    for route, count in ((":predict", 1), ("", 3)):
        series = f'code="200",model="{NAME}",route="/v1/models/{{name}}{route}",version="{VERSION}"'
        assert f"keel_requests_total{{{series}}} {count:.1f}" in text


def test_metrics_count_requests_classes_and_batches(client: TestClient) -> None:
    client.post(f"/v1/models/{NAME}:predict", json={"records": records(200)})  # enough rows for a drift score
    client.post("/v1/models/other:predict", json={"records": records(1)})
    text = client.get("/metrics").text
    assert f'keel_requests_total{{code="200",model="{NAME}",route="/v1/models/{{name}}:predict",version="{VERSION}"}}' in text
    assert 'code="404"' in text and "keel_request_duration_seconds_bucket" in text
    assert "keel_batch_size_bucket" in text and 'keel_model_info{model="small-model",version="3"} 1.0' in text
    assert 'keel_predictions_total{class_name="yes"' in text
    assert 'keel_feature_drift_psi{feature="size",model="small-model",version="3"}' in text
    assert 'keel_feature_drift_psi{feature="colour",model="small-model",version="3"}' in text  # categorical too


def test_openapi_spec_names_the_raw_columns(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    record = spec["components"]["schemas"]["Record"]
    assert set(record["properties"]) == {"size", "weight", "colour"} and record["additionalProperties"] is False


def test_a_column_the_contract_types_bool_takes_true_and_false_and_no_other_column_does(
        make_contract: Callable[..., DataContract]) -> None:
    """Strict numbers, but a boolean feature is sent as JSON true/false; a transform saved before Keel recorded
    which columns are booleans takes them for any numeric column, as it did."""
    frame = small_frame(120).assign(smoker=[True, False] * 60)
    contract = make_contract(columns={**SMALL_CONTRACT["columns"], "smoker": {"dtype": "bool"}})
    transform = FeatureTransform.fit(frame, contract)
    row = {"size": 10.0, "weight": 3.0, "colour": "red", "smoker": True}
    assert transform.boolean == ["smoker"]
    assert record_model(transform).model_validate(row).model_dump()["smoker"] is True
    assert record_model(transform).model_validate({**row, "smoker": 0}).model_dump()["smoker"] == 0
    with pytest.raises(ValidationError, match="size"):
        record_model(transform).model_validate({**row, "size": True})
    before = transform.model_copy(update={"boolean": None})
    assert record_model(before).model_validate({**row, "size": True}).model_dump()["size"] is True


def test_columns_named_as_pydantic_forbids_a_field_are_served(tmp_path: Path) -> None:
    """`_size` (a leading underscore), `model_dump` (pydantic's namespace) and `colour (paint)`: the pipeline
    trained and registered such a model, and the server failed at start-up building its request schema."""
    from tests.stages import small_config

    names = {"size": "_size", "weight": "model_dump", "colour": "colour (paint)"}
    contract = {**SMALL_CONTRACT, "columns": {names.get(k, k): v for k, v in SMALL_CONTRACT["columns"].items()}}
    source = tmp_path / "renamed.csv"
    small_frame(200).rename(columns=names).to_csv(source, index=False)
    settings = KeelSettings(home=tmp_path / ".keel")
    uris = run_stages(settings, "renamed", source, config=small_config(contract=contract))
    client = TestClient(build_app(Predictor.load(Path(uris["train"])), NAME, VERSION))
    row = {"_size": 12.0, "model_dump": 2.5, "colour (paint)": "red"}
    answered = client.post(f"/v1/models/{NAME}:predict", json={"records": [row, {**row, "_size": 5.0}]})
    assert answered.status_code == 200 and len(answered.json()["predictions"]) == 2, answered.text
    missing = client.post(f"/v1/models/{NAME}:predict", json={"records": [{"_size": 1.0, "colour (paint)": "red"}]})
    assert missing.status_code == 422 and "records.0.model_dump: Field required" in missing.json()["detail"]
    spec = client.get("/openapi.json").json()["components"]["schemas"]["Record"]
    assert set(spec["properties"]) == set(row) and set(spec["required"]) == set(row)


def test_a_shadow_copy_is_answered_as_the_served_model_answers(predictor: Predictor, tmp_path: Path) -> None:
    """What a shadow replica answers for a copy is what the model's own API returns, row by row: a class,
    or a recommender's ranked items for each user (with the k the request asked for)."""
    from keel.serve.deployment import LoadedModel
    from tests.stages import packaged_recommender

    frame = small_frame(40).drop(columns=["outcome"])
    served = LoadedModel(predictor, NAME, VERSION)
    assert served.answers(frame) == predictor.predict(frame)["prediction"].tolist()
    assert served.compared_columns == predictor.transform.input_columns and served.kind == "tabular classifier"
    shop = packaged_recommender(tmp_path)
    recommender = LoadedModel(None, "shop", "1", recommender=shop)
    users = [*shop.user_ids[:3].tolist(), "nobody"] if shop.user_id_type is str else [*shop.user_ids[:3].tolist(), -1]
    copy = pd.DataFrame({"user_id": users, "k": 4})
    assert recommender.compared_columns == list(copy.columns)
    assert recommender.answers(copy) == [tuple(r["items"]) for r in shop.recommend(users, 4)]
    assert all(len(items) == 4 for items in recommender.answers(copy))
    assert recommender.kind == f"recommender of {shop.user_id_type.__name__} user ids"


def canary_routing(champion: FastAPI, canary: FastAPI | None, weight: float = 0.5) -> CanaryRouter:
    """The champion's app routing ``weight`` of its requests to ``canary`` (None: no canary app), as a
    Serve replica sets it up, with the canary's own app answering in process instead of over a handle."""
    async def connect() -> CanaryCall:
        if canary is None:
            raise ValueError(f"Application {CANARY_APP!r} does not exist")

        async def call(request: ForwardedRequest) -> CanaryAnswer:
            return await answer_in_process(canary, request)
        return call

    router = CanaryRouter(connect, CanaryConfig(weight=weight), CanaryMetrics(CollectorRegistry(), NAME, VERSION))
    champion.state.divert = router.divert
    return router


def routing_keys(router: CanaryRouter) -> tuple[str, str]:
    """A routing key the canary answers and one the champion answers."""
    keys = [f"user-{i}" for i in range(100)]
    return next(k for k in keys if router.chosen(k)), next(k for k in keys if not router.chosen(k))


def test_a_canary_answers_the_requests_routed_to_it_with_its_own_version(predictor: Predictor) -> None:
    champion = build_app(predictor, NAME, VERSION, token=TOKEN)
    router = canary_routing(champion, build_app(predictor, NAME, "4", token=TOKEN))
    to_canary, to_champion = routing_keys(router)
    client, auth = TestClient(champion), {"authorization": f"Bearer {TOKEN}"}
    for key, version in ((to_canary, "4"), (to_champion, VERSION)):
        response = client.post(f"/v1/models/{NAME}:predict?debug=1", json={"records": records(2)},
                               headers={**auth, "x-routing-key": key, "x-request-id": f"req-{key}"})
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == response.headers["x-model-version"] == version
        assert response.json()["request_id"] == response.headers["x-request-id"] == f"req-{key}"
        assert len(response.json()["predictions"]) == 2
    bad = client.post(f"/v1/models/{NAME}:predict", json={"records": [{"nope": 1}]},
                      headers={**auth, "x-routing-key": to_canary})
    assert bad.status_code == 422 and bad.json()["model_version"] == "4"  # the canary's own refusal
    metadata = client.get(f"/v2/models/{NAME}", headers={**auth, "x-routing-key": to_canary})
    assert metadata.json()["versions"] == [VERSION]  # only scoring requests are routed
    unauthorized = client.post(f"/v1/models/{NAME}:predict", json={"records": records(1)},
                               headers={"x-routing-key": to_canary})
    assert unauthorized.status_code == 401 and unauthorized.json()["model_version"] == VERSION  # checked first
    outcomes = {o: router.metrics.registry.get_sample_value("keel_canary_requests_total",
                                                            {"model": NAME, "version": VERSION, "outcome": o})
                for o in ("answered", "rejected", "fell_back")}
    assert outcomes == {"answered": 1, "rejected": 1, "fell_back": 0}


def test_with_its_canary_gone_the_champion_answers_everything(predictor: Predictor) -> None:
    champion = build_app(predictor, NAME, VERSION)
    router = canary_routing(champion, None)
    to_canary, _ = routing_keys(router)
    response = TestClient(champion).post(f"/v1/models/{NAME}:predict", json={"records": records(1)},
                                         headers={"x-routing-key": to_canary})
    assert response.status_code == 200 and response.json()["model_version"] == VERSION
    assert router.metrics.registry.get_sample_value("keel_canary_requests_total", {
        "model": NAME, "version": VERSION, "outcome": "unavailable"}) == 1
