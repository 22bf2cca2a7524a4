"""The publish endpoint's refusals: exact status and {"error","message"} body."""

import pytest

from herald_client import ADMIN_KEY, PROJECTS, assert_error_body, publish_raw

GOOD = '{"project":"shop","topic":"news","data":{"a":1}}'


@pytest.mark.parametrize(
    "key", [None, "wrong-key", "", PROJECTS["shop"]["secret"]], ids=["missing", "wrong", "empty", "jwt-secret"]
)
def test_publish_without_a_valid_key_is_401(server, key):
    r = publish_raw(server, GOOD, key=key)
    assert r.status == 401, (r.status, r.body)
    assert_error_body(r.body, "unauthorized")


def test_publish_with_another_projects_key_is_403(server):
    r = publish_raw(server, GOOD, key=PROJECTS["blog"]["api_key"])
    assert r.status == 403, (r.status, r.body)
    assert_error_body(r.body, "forbidden")


@pytest.mark.parametrize("key", [ADMIN_KEY, PROJECTS["shop"]["api_key"]], ids=["admin", "project"])
def test_publish_to_unknown_project_is_404_or_403(server, key):
    body = '{"project":"nosuchproject","topic":"news","data":1}'
    r = publish_raw(server, body, key=key)
    if key == ADMIN_KEY:
        # The admin key acts on every project, so the only fault is the project.
        assert r.status == 404, (r.status, r.body)
        assert_error_body(r.body, "unknown_project")
    else:
        # A project key acts on its own project only: refused either way, never published.
        assert r.status in (403, 404), (r.status, r.body)


@pytest.mark.parametrize(
    "body",
    ['{"project":"shop","topic":"news","data":', "not json", "", "[1,2]"],
    ids=["truncated", "garbage", "empty", "array"],
)
def test_publish_invalid_json_is_400(server, body):
    r = publish_raw(server, body)
    assert r.status == 400, (r.status, r.body)
    assert_error_body(r.body, "bad_request")


def test_publish_answers_json_id(server):
    r = publish_raw(server, GOOD)
    assert r.status == 200, (r.status, r.body)
    answer = r.json()
    assert set(answer) == {"id"} and isinstance(answer["id"], str) and answer["id"], answer
