"""[[notify]] webhooks against a real HTTP receiver on loopback: one node process receives
three small phantom studies (one complete, one whose images exceed pipeline.max_pixels, one
lacking a view) and its hooks are told result.ready, study.failed, study.incomplete and
delivery.failed; signatures are checked with an HMAC computed here (RFC 2104)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select
from support.dicom import send_datasets
from support.node import NodeProcess, cli, write_config
from support.paths import REPO

from mammonode.config import NOTIFY_EVENTS, ConfigError, NotifyHook, load_config
from mammonode.db import notifications, queries
from mammonode.db.migrate import upgrade
from mammonode.db.models import Event, NotifyDelivery
from mammonode.db.session import Database
from mammonode.demo.loopback import free_port
from mammonode.demo.phantom import exam_datasets
from mammonode.pipeline.weights_admin import generate_test_weights

pytestmark = pytest.mark.network

SECRET = "hook-secret-ü"
PATIENT_ID = "NTFY-PID-7731"
PATIENT_NAME = "Nightingale^Florence"
FAILED_ID = "NTFY-PID-8842"
PARTIAL_ID = "NTFY-PID-9953"


class Receiver:
    """An HTTP server that records every POST (path, headers, body, the status it answered);
    ``fail_first[path] = n`` answers 503 to the first n, ``/redirect`` always answers 302."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail_first: dict[str, int] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    if self.path == "/redirect":
                        status = 302
                    elif receiver.fail_first.get(self.path, 0) > 0:
                        receiver.fail_first[self.path] -= 1
                        status = 503
                    else:
                        status = 204
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "status": status}
                    )
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def at(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def events(self, path: str, kind: str, study_uid: str) -> list[dict]:
        """The accepted (2xx) bodies of ``kind`` for ``study_uid`` at ``path``, parsed."""
        out = []
        for request in self.at(path):
            body = json.loads(request["body"])
            if request["status"] < 300 and body["event"] == kind and body["study"]["study_instance_uid"] == study_uid:
                out.append(body)
        return out


@pytest.fixture(scope="module")
def hooks(tmp_path_factory):
    """The node, its receiver and the three studies, once every expected request has come."""
    tmp = tmp_path_factory.mktemp("notify")
    weights = generate_test_weights(tmp / "weights", models=("density_histogram",))
    receiver = Receiver().start()
    receiver.fail_first["/flaky"] = 2
    node = NodeProcess(
        tmp / "node",
        weights_dir=weights,
        pipeline={"models": ["density_histogram"], "max_pixels": 300_000},
        study={"quiet_period_s": 1.0, "incomplete_timeout_s": 4.0},
        delivery={"max_attempts": 1},
        # Nothing listens there: the results' delivery fails at once, for good (max_attempts 1).
        destinations=[{"name": "nowhere", "ae_title": "NOWHERE", "host": "127.0.0.1", "port": free_port()}],
        notify=[
            {"name": "plain", "url": receiver.url("/plain")},
            {"name": "signed", "url": receiver.url("/signed"), "secret": SECRET, "events": ["result.ready"]},
            {"name": "flaky", "url": receiver.url("/flaky"), "events": ["result.ready"], "max_attempts": 5},
            {"name": "phi", "url": receiver.url("/phi"), "include_phi": True, "events": ["result.ready"]},
            {"name": "redirect", "url": receiver.url("/redirect"), "events": ["result.ready"], "max_attempts": 2},
        ],
    ).start()
    complete = exam_datasets(shape=(600, 480), patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
    too_large = exam_datasets(shape=(640, 480), patient_id=FAILED_ID, patient_name=PATIENT_NAME)  # 307 200 pixels
    partial = exam_datasets(shape=(200, 160), patient_id=PARTIAL_ID, patient_name=PATIENT_NAME)[:3]  # no R-MLO
    uids = {
        "complete": str(complete[0].StudyInstanceUID),
        "failed": str(too_large[0].StudyInstanceUID),
        "partial": str(partial[0].StudyInstanceUID),
    }
    try:
        assert send_datasets(node.port, complete + too_large + partial) == [0] * 11
        expected = [
            ("/plain", "result.ready", "complete"),
            ("/plain", "delivery.failed", "complete"),
            ("/plain", "study.failed", "failed"),
            ("/plain", "study.incomplete", "partial"),
            ("/signed", "result.ready", "complete"),
            ("/flaky", "result.ready", "complete"),
            ("/phi", "result.ready", "complete"),
        ]

        def arrived():
            got = all(receiver.events(path, kind, uids[study]) for path, kind, study in expected)
            return got and len(receiver.at("/redirect")) >= 2 and "given up" in node.log()

        node.wait_for(arrived, timeout=90, interval=0.3, what="every expected notification")
        time.sleep(1.5)  # room for a duplicate, were one to come
        yield receiver, node, uids
    finally:
        node.stop(timeout=20)
        receiver.stop()


def test_result_ready_names_the_study_and_carries_no_phi(hooks):
    receiver, _, uids = hooks
    [body] = receiver.events("/plain", "result.ready", uids["complete"])
    assert body["node"] == {"ae_title": "MAMMONODE"}
    assert body["details"]["views"] == ["L-CC", "R-CC", "L-MLO", "R-MLO"]
    assert body["details"]["missing_views"] == []
    probabilities = body["details"]["density"]["histogram"]["probabilities"]
    assert len(probabilities) == 4 and abs(sum(probabilities) - 1.0) < 1e-3  # BI-RADS a-d
    assert body["details"]["test_weights"] is True
    assert "patient" not in body
    for request in receiver.at("/plain") + receiver.at("/signed") + receiver.at("/flaky"):
        raw = request["body"].decode()
        for value in (PATIENT_ID, FAILED_ID, PARTIAL_ID, "Nightingale", "Florence", "PHANTOM"):
            assert value not in raw
        assert "X-Mammonode-Signature" not in request["headers"] or request["path"] == "/signed"


def test_signature_is_hmac_sha256_over_timestamp_and_body(hooks):
    receiver, _, _ = hooks
    [request] = receiver.at("/signed")
    timestamp = request["headers"]["X-Mammonode-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 300
    signed = timestamp.encode() + b"." + request["body"]
    expected = hmac.new(SECRET.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    assert request["headers"]["X-Mammonode-Signature"] == f"sha256={expected}"
    assert request["headers"]["Content-Type"] == "application/json"
    assert json.loads(request["body"])["event"] == request["headers"]["X-Mammonode-Event"] == "result.ready"


def test_a_failing_hook_gets_the_event_on_the_third_attempt_once(hooks):
    receiver, _, _ = hooks
    requests = receiver.at("/flaky")
    assert [r["status"] for r in requests] == [503, 503, 204]
    bodies = [json.loads(r["body"]) for r in requests]
    assert [b["attempt"] for b in bodies] == [1, 2, 3]
    assert len({b["event_id"] for b in bodies}) == 1
    assert requests[2]["headers"]["X-Mammonode-Delivery"] == bodies[0]["event_id"]


def test_incomplete_study_names_its_missing_view(hooks):
    receiver, _, uids = hooks
    [body] = receiver.events("/plain", "study.incomplete", uids["partial"])
    assert body["details"]["missing_views"] == ["R-MLO"]
    assert body["details"]["views"] == ["L-CC", "R-CC", "L-MLO"]
    assert body["details"]["partial_result_queued"] is False


def test_failed_study_says_why(hooks):
    receiver, _, uids = hooks
    [body] = receiver.events("/plain", "study.failed", uids["failed"])
    assert "more than pipeline.max_pixels (300000)" in body["details"]["error"]
    assert not receiver.events("/plain", "result.ready", uids["failed"])


def test_delivery_failed_names_the_destination(hooks):
    receiver, _, uids = hooks
    bodies = receiver.events("/plain", "delivery.failed", uids["complete"])
    assert len(bodies) == 1  # one per study and destination, not one per object
    details = bodies[0]["details"]
    assert details["destination"] == "nowhere"
    assert details["objects"] == len(details["sop_instance_uids"]) >= 1


def test_hook_with_include_phi_gets_the_patient(hooks):
    receiver, _, uids = hooks
    [body] = receiver.events("/phi", "result.ready", uids["complete"])
    assert body["patient"]["patient_id"] == PATIENT_ID
    assert body["patient"]["patient_name"] == PATIENT_NAME
    assert body["patient"]["accession_number"] == "PHANTOM"


def test_redirect_is_a_failed_attempt_never_followed(hooks):
    receiver, node, _ = hooks
    assert [r["status"] for r in receiver.at("/redirect")] == [302, 302]  # max_attempts = 2
    assert not receiver.at("/elsewhere")
    log = node.log()
    assert "notify redirect: result.ready" in log and "given up after 2 attempts" in log
    for value in (PATIENT_ID, FAILED_ID, PARTIAL_ID, "Nightingale"):
        assert value not in log


def test_admin_views_show_each_hooks_sends_and_what_is_failing(hooks):
    """`mammonode notifications`, `status` and the status page, against what the receiver saw."""
    receiver, node, uids = hooks
    rows = json.loads(cli("notifications", "--json", config=node.config).stdout)
    sends = {(r["hook"], r["event"], r["study_instance_uid"]): r for r in rows}
    flaky = sends[("flaky", "result.ready", uids["complete"])]
    assert (flaky["state"], flaky["attempts"], flaky["last_status"], flaky["last_error"]) == ("delivered", 3, 204, None)
    assert flaky["event_id"] == json.loads(receiver.at("/flaky")[0]["body"])["event_id"]
    redirect = sends[("redirect", "result.ready", uids["complete"])]
    assert (redirect["state"], redirect["attempts"], redirect["last_status"]) == ("failed", 2, 302)
    assert redirect["last_error"] == "HTTP 302 redirect (not followed)" and redirect["next_attempt_at"] is None
    plain = {(r["event"], r["study_instance_uid"]) for r in rows if r["hook"] == "plain" and r["state"] == "delivered"}
    bodies = [json.loads(r["body"]) for r in receiver.at("/plain")]
    assert plain == {(b["event"], b["study"]["study_instance_uid"]) for b in bodies}
    only = json.loads(
        cli("notifications", "--json", "--hook", "redirect", "--state", "failed", config=node.config).stdout
    )
    assert [(r["hook"], r["state"]) for r in only] == [("redirect", "failed")]

    status = json.loads(cli("status", "--json", config=node.config).stdout)
    assert status["notifications"]["failed"] == 1 and status["notifications"]["delivered"] == len(rows) - 1
    [failing] = status["failing"]["notifications"]
    assert (failing["hook"], failing["failed"], failing["retrying"]) == ("redirect", 1, 0)
    text = cli("status", config=node.config).stdout
    assert "notifications to redirect: 1 failed, 0 retrying" in text and "HTTP 302 redirect" in text
    page = urllib.request.urlopen(f"http://127.0.0.1:{node.web_port}/", timeout=10).read().decode()
    assert "notifications to <b>redirect</b>: 1 failed" in page

    assert cli("notifications", "--hook", "nosuch", config=node.config).stdout.strip() == "no notifications matching"
    done = cli("notifications", "--state", "x", config=node.config, check=False)
    assert done.returncode == 2 and "--state: 'x' is not one of" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# -- the rows, on SQLite and PostgreSQL ----------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 't.sqlite'}"
    else:
        from support.pg import PostgresServer

        server = PostgresServer().start()
        request.addfinalizer(server.stop)
        url = server.url
    db = Database(url)
    upgrade(db.engine)
    yield db
    db.dispose()


def test_events_fan_out_retry_give_up_are_reclaimed_and_pruned(database):
    db, t0 = database, datetime(2026, 1, 1, tzinfo=UTC)
    with db.session() as s:
        notifications.queue(s, "result.ready", "1.2.3", {"cancer": {}})
        notifications.queue(s, "study.failed", "1.2.4", {"error": "boom"})
    wants = {"all": NOTIFY_EVENTS, "ready": ("result.ready",)}
    with db.session() as s:
        assert notifications.dispatch(s, {**wants, "gone": NOTIFY_EVENTS}, now=t0) == 2
    with db.session() as s:  # "gone" left the configuration: its pending rows fail
        assert notifications.dispatch(s, wants, now=t0) == 0
        rows = s.execute(select(NotifyDelivery.hook, NotifyDelivery.state)).all()
    assert sorted(rows) == [("all", "pending"), ("all", "pending"), ("gone", "failed"), ("gone", "failed")] + [
        ("ready", "pending")
    ]

    def retry_in(attempts: int) -> float:
        return 10.0 * attempts

    with db.session() as s:
        first = notifications.claim_next(s, "ready", "me", 60, now=t0)
        assert (first.kind, first.study_instance_uid, first.attempt) == ("result.ready", "1.2.3", 1)
    with db.session() as s:
        assert notifications.claim_next(s, "ready", "me", 60, now=t0) is None  # being sent
        assert notifications.record_attempt(s, first.delivery_id, False, 503, "HTTP 503", 2, retry_in, t0) == "pending"
    with db.session() as s:  # what the admin views read (status, notifications), on this backend
        failing = {f["hook"]: f for f in queries.failing_hooks(s)}
        # "gone" left the configuration: its sends are listed, but not a failure of a hook.
        assert {h: (f["failed"], f["retrying"]) for h, f in failing.items()} == {"ready": (0, 1)}
        assert failing["ready"]["next_attempt_at"].startswith("2026-01-01T00:00:10")
        [listed] = queries.notifications(s, hook="ready")
        assert (listed["state"], listed["attempts"], listed["last_status"], listed["last_error"]) == (
            "pending",
            1,
            503,
            "HTTP 503",
        )
        assert {r["hook"] for r in queries.notifications(s, state="failed")} == {"gone"}
        assert len(queries.notifications(s, limit=2)) == 2
    with db.session() as s:
        assert notifications.claim_next(s, "ready", "me", 60, now=t0 + timedelta(seconds=9)) is None
        again = notifications.claim_next(s, "ready", "me", 60, now=t0 + timedelta(seconds=10))
        assert (again.event_uid, again.attempt) == (first.event_uid, 2)
        assert notifications.record_attempt(s, again.delivery_id, False, None, "refused", 2, retry_in, t0) == "failed"
        assert (
            s.execute(select(Event.message).where(Event.kind == "notify-failed"))
            .scalars()
            .all()[-1]
            .startswith("result.ready to hook ready: refused after 2 attempts")
        )
    with db.session() as s:
        assert [(f["hook"], f["failed"], f["retrying"]) for f in queries.failing_hooks(s)] == [("ready", 1, 0)]
    with db.session() as s:
        kinds = []
        for _ in range(2):
            claimed = notifications.claim_next(s, "all", "me", 60, now=t0)
            kinds.append(claimed.kind)
            notifications.record_attempt(s, claimed.delivery_id, True, 204, "", 8, retry_in, t0)
    assert kinds == ["result.ready", "study.failed"]  # oldest first
    with db.session() as s:  # the hook takes its next event: no longer failing now, its failure still listed
        notifications.queue(s, "result.ready", "1.2.6", {"cancer": {}})
    with db.session() as s:
        notifications.dispatch(s, wants, now=t0 + timedelta(seconds=20))
    with db.session() as s:
        for hook in ("ready", "all"):
            later = notifications.claim_next(s, hook, "me", 60, now=t0 + timedelta(seconds=20))
            notifications.record_attempt(s, later.delivery_id, True, 204, "", 2, retry_in, t0 + timedelta(seconds=21))
    with db.session() as s:
        assert queries.failing_hooks(s) == []
        assert [r["state"] for r in queries.notifications(s, hook="ready")] == ["delivered", "failed"]
    with db.session() as s:
        assert notifications.prune(s, now=t0 + timedelta(days=29)) == 0
        assert notifications.prune(s, now=t0 + timedelta(days=31)) == 3
        assert s.execute(select(NotifyDelivery)).first() is None

    # A sender that died mid-POST: its claim is due again once stale.
    with db.session() as s:
        notifications.queue(s, "study.incomplete", "1.2.5", {"missing_views": ["R-MLO"]})
    with db.session() as s:
        notifications.dispatch(s, {"h": NOTIFY_EVENTS}, now=t0)
    with db.session() as s:
        assert notifications.claim_next(s, "h", "dead", 60, now=t0) is not None
    with db.session() as s:
        assert notifications.claim_next(s, "h", "me", 60, now=t0 + timedelta(seconds=59)) is None
        assert notifications.claim_next(s, "h", "me", 60, now=t0 + timedelta(seconds=61)).attempt == 1


# -- configuration -----------------------------------------------------------------------


def _config(tmp_path, *hooks: dict):
    return write_config(tmp_path / "config.toml", {"storage": {"directory": str(tmp_path / "s")}}, notify=list(hooks))


def test_hook_defaults(tmp_path):
    [hook] = load_config(_config(tmp_path, {"name": "ris", "url": "https://ris.example.org/hook"}), environ={}).notify
    assert hook.events == ["result.ready", "study.failed", "study.incomplete", "delivery.failed"]
    assert (hook.secret, hook.include_phi) == ("", False)


@pytest.mark.parametrize(
    ("hook", "key"),
    [
        ({"name": "a", "url": "https://x.org", "events": ["result.ready", "study.done"]}, "notify[0].events"),
        ({"name": "a", "url": "https://x.org", "events": []}, "notify[0].events"),
        ({"name": "a", "url": "ftp://x.org/hook"}, "notify[0].url"),
        ({"name": "a", "url": "https:///nohost"}, "notify[0].url"),
        ({"name": "a", "url": "http://x.org:99999/"}, "notify[0].url"),
        ({"name": "a"}, "notify[0].url"),
        ({"name": "a", "url": "https://x.org", "include_phi": "yes"}, "notify[0].include_phi"),
        ({"name": "a", "url": "https://x.org", "timeout_s": 0}, "notify[0].timeout_s"),
        ({"name": "a", "url": "https://x.org", "max_attempts": 0}, "notify[0].max_attempts"),
        ({"name": "a", "url": "https://x.org", "retries": 3}, "notify[0].retries"),
        ({"name": "a b", "url": "https://x.org"}, "notify[0].name"),
    ],
)
def test_bad_hook_is_one_error_naming_the_key(tmp_path, hook, key):
    with pytest.raises(ConfigError) as raised:
        load_config(_config(tmp_path, hook), environ={})
    assert str(raised.value).startswith(key + ":")


def test_the_documented_example_in_config_toml_shows_the_defaults(tmp_path):
    text = (REPO / "config.toml").read_text()
    example = text[text.index("# [[notify]]") :].split("\n\n")[0]
    (tmp_path / "example.toml").write_text("\n".join(re.sub(r"^# ?", "", line) for line in example.splitlines()))
    [hook] = load_config(tmp_path / "example.toml", environ={}).notify
    assert hook == NotifyHook(name="ris", url="https://ris.example.org/mammonode-hook")


def test_duplicate_hook_names(tmp_path):
    config = _config(tmp_path, {"name": "a", "url": "https://x.org"}, {"name": "a", "url": "https://y.org"})
    with pytest.raises(ConfigError, match="^notify: names must be unique"):
        load_config(config, environ={})


def test_cli_says_a_bad_hook_in_one_line(tmp_path):
    config = _config(tmp_path, {"name": "ris", "url": "https://ris.example.org", "events": ["study.done"]})
    result = cli("status", config=config, check=False, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "notify[0].events" in line and "study.done" in line


def test_webhook_rows_of_a_dead_sender_on_this_host_are_released_at_start(database):
    """As for result deliveries: a POST left in flight by a process that is gone is due
    again at the next start, not after the stale-claim timeout."""
    from mammonode.db.outbox import Claimer, release_dead_claims

    db, t0 = database, datetime(2026, 1, 1, tzinfo=UTC)
    with db.session() as s:
        notifications.queue(s, "result.ready", "1.2.3", {"cancer": {}})
    with db.session() as s:
        assert notifications.dispatch(s, {"hook": NOTIFY_EVENTS}, now=t0) == 1
    dead = Claimer("here", 111, "old", "notify-hook")
    with db.session() as s:
        claimed = notifications.claim_next(s, "hook", str(dead), 3600, now=t0)
    with db.session() as s:
        assert notifications.claim_next(s, "hook", "other", 3600, now=t0) is None  # in flight
        assert release_dead_claims(s, "elsewhere", lambda who: False, NotifyDelivery) == 0
        assert release_dead_claims(s, "here", lambda who: who.pid != dead.pid, NotifyDelivery) == 1
    with db.session() as s:
        again = notifications.claim_next(s, "hook", "other", 3600, now=t0)
        assert again is not None and again.event_uid == claimed.event_uid
