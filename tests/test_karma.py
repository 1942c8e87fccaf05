"""Karma: grants add up, a threshold crossing opens exactly one age-up request (with its ledger
event, in the same transaction), idempotency keys, bad amounts, persistence, concurrency, atomicity.

Every test runs on SQLite and, when ``EVOLUTION_TEST_PG_URL`` is set, on PostgreSQL (the
``backend`` / ``ledger_url`` fixtures of ``tests/ledger/conftest.py``).
"""

from __future__ import annotations

import math
import threading

import pytest
from sqlalchemy import text

from evolution.intake.karma import DONE, FAILED, MAX_AMOUNT, PENDING, RUNNING, Karma, KarmaError
from evolution.ledger import KARMA_THRESHOLD_CROSSED, Ledger
from evolution.ledger import events as ev
from evolution.ledger.store import Transaction
from evolution.paths import DataRoot
from tests.ledger.conftest import backend, data_root, ledger_url  # noqa: F401  (fixtures)


@pytest.fixture
def led(data_root, ledger_url):  # noqa: F811
    led = Ledger.open(data_root, ledger_url)
    yield led
    led.close()


def _rows(led: Ledger, table: str) -> int:
    with led.reading() as conn:
        return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


def _crossings(led: Ledger):
    return led.entries(kind=KARMA_THRESHOLD_CROSSED)


# -- adding up, state, one request per crossing ---------------------------------------------


def test_grants_add_up_and_state_reports_progress(led):
    k = Karma(led, threshold=10)
    s = k.state()
    assert (s.total, s.progress, s.threshold, s.to_next, s.open_request) == (0.0, 0.0, 10.0, 10.0, None)

    g1 = k.add(3, reason="nice answer", key="a")
    g2 = k.add(2.5, reason="funny")
    assert not g1.duplicate and not g2.duplicate and g1.triggered is None and g2.triggered is None
    assert g2.id != g1.id
    s = k.state()
    assert (s.total, s.progress, s.threshold, s.to_next) == (5.5, 5.5, 10.0, 4.5)
    assert s.open_request is None
    assert g2.state == s
    assert k.requests() == [] and _crossings(led) == []
    d = s.to_dict()
    assert d["total"] == 5.5 and d["to_next"] == 4.5 and d["open_request"] is None


def test_crossing_opens_exactly_one_request_and_one_ledger_event(led):
    k = Karma(led, threshold=10)
    k.add(6)
    g = k.add(5, served_gen=3)  # 11 >= 10: crosses
    assert g.triggered is not None
    req = g.triggered
    assert (req.status, req.threshold, req.karma, req.gen, req.outcome) == (PENDING, 10.0, 11.0, None, None)
    assert k.requests() == [req]

    # the threshold is spent: progress counts toward the next age-up
    s = k.state()
    assert (s.total, s.progress, s.threshold, s.to_next) == (11.0, 1.0, 10.0, 9.0)
    assert s.open_request == req
    assert g.state == s

    events = _crossings(led)
    assert len(events) == 1
    e = events[0]
    assert e.gen == 3
    assert e.payload == {"karma": 11.0, "threshold": 10.0, "request": req.id}
    assert len(led.entries()) == 1  # nothing else was appended
    report = led.verify()
    assert report.ok, report.problems
    assert report.head is not None and report.head.seq == e.seq


def test_karma_while_a_request_is_open_keeps_counting_but_opens_no_second(led):
    k = Karma(led, threshold=10)
    first = k.add(10).triggered
    assert first is not None
    for _ in range(5):  # 25 more: far past the next threshold, but one request is open
        assert k.add(5).triggered is None
    s = k.state()
    assert (s.total, s.progress, s.threshold) == (35.0, 25.0, 10.0)
    assert s.open_request == first
    assert k.maybe_trigger() is None  # still open
    k.mark(first.id, RUNNING, gen=1)
    assert k.add(1).triggered is None and k.maybe_trigger() is None  # running is open too
    assert len(k.requests()) == 1 and len(_crossings(led)) == 1

    k.mark(first.id, DONE, gen=1, outcome="promoted")
    second = k.maybe_trigger(served_gen=1)
    assert second is not None and second.id != first.id
    assert (second.status, second.threshold, second.karma) == (PENDING, 10.0, 36.0)
    assert k.maybe_trigger() is None  # the second is open now
    s = k.state()
    assert (s.total, s.progress, s.open_request) == (36.0, 16.0, second)
    assert [e.payload["request"] for e in _crossings(led)] == [first.id, second.id]
    assert _crossings(led)[1].gen == 1
    assert led.verify().ok


def test_maybe_trigger_after_done_waits_for_the_next_threshold(led):
    k = Karma(led, threshold=10)
    first = k.add(12).triggered
    k.mark(first.id, DONE, gen=1, outcome="promoted")
    assert k.maybe_trigger() is None  # progress 2 < 10
    assert len(k.requests()) == 1 and len(_crossings(led)) == 1
    assert k.add(7).triggered is None  # progress 9
    assert k.maybe_trigger() is None
    second = k.add(1).triggered  # progress 10: no request open, so the grant itself opens it
    assert second is not None and second.karma == 20.0
    assert len(k.requests()) == 2 and len(_crossings(led)) == 2


def test_failed_request_lets_the_next_one_open(led):
    k = Karma(led, threshold=5)
    first = k.add(5).triggered
    k.add(5)
    k.mark(first.id, FAILED, outcome="gate failed")
    second = k.maybe_trigger()
    assert second is not None and second.threshold == 5.0


def test_threshold_grows_per_age_up(led):
    k = Karma(led, threshold=10, growth=2)
    assert [k.threshold_for(i) for i in range(3)] == [10.0, 20.0, 40.0]
    thresholds = []
    for _ in range(3):
        s = k.state()
        assert s.open_request is None
        assert k.add(s.threshold - 1).triggered is None  # one short
        req = k.add(1).triggered
        assert req is not None
        thresholds.append(req.threshold)
        assert k.state().threshold == k.threshold_for(len(thresholds))
        k.mark(req.id, DONE, gen=len(thresholds), outcome="promoted")
    assert thresholds == [10.0, 20.0, 40.0]
    s = k.state()
    assert (s.total, s.progress, s.threshold, s.to_next) == (70.0, 0.0, 80.0, 80.0)
    assert [e.payload["threshold"] for e in _crossings(led)] == [10.0, 20.0, 40.0]


@pytest.mark.parametrize("threshold, growth", [(0, 1), (-1, 1), (math.nan, 1), (math.inf, 1), ("10", 1),
                                               (10, 0.5), (10, math.nan), (10, math.inf)])
def test_bad_threshold_or_growth_is_refused(led, threshold, growth):
    with pytest.raises(KarmaError):
        Karma(led, threshold=threshold, growth=growth)


# -- idempotency ------------------------------------------------------------------------------


def test_same_key_same_amount_is_a_duplicate_that_adds_nothing(led):
    k = Karma(led, threshold=100)
    g1 = k.add(4, reason="r", key="req-1")
    g2 = k.add(4, reason="retry", key="req-1")
    g3 = k.add(4.0, key="req-1")  # the same amount written as a float
    assert not g1.duplicate and g2.duplicate and g3.duplicate
    assert g2.id == g3.id == g1.id and g2.amount == 4.0
    assert k.state().total == 4.0 and g2.state.total == 4.0
    assert _rows(led, "karma_events") == 1
    assert not k.add(4, key="req-2").duplicate  # another key is another grant
    assert k.state().total == 8.0


def test_duplicate_of_a_crossing_grant_opens_nothing_more_and_reports_the_first_request(led):
    k = Karma(led, threshold=5)
    first = k.add(5, key="x").triggered
    assert first is not None
    again = k.add(5, key="x")
    assert again.duplicate and again.triggered.id == first.id  # a retrying client still learns it crossed
    assert len(k.requests()) == 1 and len(_crossings(led)) == 1 and k.state().total == 5.0


def test_same_key_different_amount_is_refused(led):
    k = Karma(led, threshold=100)
    k.add(4, key="req-1")
    with pytest.raises(KarmaError, match="req-1"):
        k.add(5, key="req-1")
    assert k.state().total == 4.0 and _rows(led, "karma_events") == 1


@pytest.mark.parametrize("key", ["", "k" * 201, 7])
def test_bad_key_is_refused(led, key):
    k = Karma(led, threshold=100)
    with pytest.raises(KarmaError):
        k.add(1, key=key)
    assert _rows(led, "karma_events") == 0


# -- bad amounts ------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, MAX_AMOUNT * 1.0001,
                                    MAX_AMOUNT + 1, True, False, "5", None, [1], 1 + 0j])
def test_bad_amounts_are_refused_and_record_nothing(led, amount):
    k = Karma(led, threshold=10)
    k.add(1)
    with pytest.raises(KarmaError):
        k.add(amount, key="bad")
    assert k.state().total == 1.0
    assert _rows(led, "karma_events") == 1 and _rows(led, "ageup_requests") == 0
    assert k.add(2, key="bad").amount == 2.0  # the key was not taken by the refused grant


def test_huge_integer_amount_is_a_karma_error(led):
    k = Karma(led, threshold=10)
    with pytest.raises(KarmaError):
        k.add(10**400)


def test_fractional_grants_that_add_up_to_the_threshold_cross_it(led):
    k = Karma(led, threshold=1)
    grants = [k.add(a) for a in (0.7, 0.1, 0.1, 0.1)]
    assert grants[-1].triggered is not None


def test_max_amount_is_accepted(led):
    k = Karma(led, threshold=MAX_AMOUNT * 10)
    assert k.add(MAX_AMOUNT).amount == MAX_AMOUNT
    assert k.add(int(MAX_AMOUNT)).amount == MAX_AMOUNT


@pytest.mark.parametrize("reason", [None, 5, "r" * 501])
def test_bad_reason_is_refused(led, reason):
    k = Karma(led, threshold=10)
    with pytest.raises(KarmaError):
        k.add(1, reason=reason)
    assert _rows(led, "karma_events") == 0


# -- persistence ------------------------------------------------------------------------------


def test_state_survives_reopening(led, ledger_url):  # noqa: F811
    k = Karma(led, threshold=10, growth=2)
    first = k.add(12, key="a").triggered
    k.mark(first.id, DONE, gen=1, outcome="promoted")
    k.add(3, reason="later")
    before, requests = k.state(), k.requests()
    led.close()

    with Ledger.open(DataRoot.from_env(), ledger_url) as again:
        k2 = Karma(again, threshold=10, growth=2)
        assert k2.state() == before
        assert k2.requests() == requests
        assert (before.total, before.progress, before.threshold) == (15.0, 5.0, 20.0)
        assert k2.add(12, key="a").duplicate  # the key is remembered too
        assert again.verify().ok


# -- mark -------------------------------------------------------------------------------------


def test_mark_sets_status_gen_outcome_and_finished_time(led):
    k = Karma(led, threshold=1)
    req = k.add(1).triggered
    k.mark(req.id, RUNNING, gen=4)
    (r,) = k.requests()
    assert (r.status, r.gen, r.outcome, r.finished_time) == (RUNNING, 4, None, None)
    assert k.state().open_request == r

    k.mark(req.id, DONE, outcome="promoted")  # gen kept when not given
    (r,) = k.requests()
    assert (r.status, r.gen, r.outcome) == (DONE, 4, "promoted")
    assert r.finished_time is not None and r.finished_time >= r.time
    assert k.state().open_request is None

    req2 = k.add(1).triggered
    k.mark(req2.id, FAILED, gen=5, outcome="gate: recall 0.2 < 0.5")
    r2 = k.requests()[1]
    assert (r2.status, r2.gen, r2.outcome) == (FAILED, 5, "gate: recall 0.2 < 0.5")
    assert r2.finished_time is not None
    assert k.requests()[0] == r  # the other request is untouched


def test_mark_refuses_an_unknown_status(led):
    k = Karma(led, threshold=1)
    req = k.add(1).triggered
    with pytest.raises(ValueError):
        k.mark(req.id, "exploded")
    assert k.requests()[0].status == PENDING


# -- atomicity --------------------------------------------------------------------------------


def _boom(*_a, **_k):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("where", ["event_builder", "record"])
def test_a_failing_transaction_leaves_neither_grant_nor_request(led, monkeypatch, where):
    k = Karma(led, threshold=10)
    k.add(9, key="before")
    if where == "event_builder":
        monkeypatch.setattr(ev, "karma_threshold_crossed", _boom)
    else:
        monkeypatch.setattr(Transaction, "record", _boom)
    with pytest.raises(RuntimeError, match="injected"):
        k.add(5, key="crossing")  # both INSERTs ran before the failure
    monkeypatch.undo()

    s = k.state()
    assert (s.total, s.progress, s.open_request) == (9.0, 9.0, None)
    assert _rows(led, "karma_events") == 1 and _rows(led, "ageup_requests") == 0
    assert _crossings(led) == [] and led.verify().ok
    g = k.add(5, key="crossing")  # the key was not kept either: the retry is a new grant
    assert not g.duplicate and g.triggered is not None and len(_crossings(led)) == 1


# -- concurrency: each thread opens its own Ledger, as separate processes / requests do --------


def _run_threads(n: int, target) -> list[BaseException]:
    errors: list[BaseException] = []
    lock = threading.Lock()

    def wrapped(i):
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    return errors


THREADS, GRANTS = 8, 100


def test_concurrent_grants_lose_nothing_and_open_one_request(led, data_root, ledger_url):  # noqa: F811
    barrier = threading.Barrier(THREADS)
    triggered: list = []

    def worker(i):
        with Ledger.open(DataRoot(data_root.root), ledger_url) as mine:
            k = Karma(mine, threshold=50)
            barrier.wait()
            for j in range(GRANTS):
                g = k.add(1, reason=f"t{i}", key=f"t{i}-{j}", source="test")
                if g.triggered is not None:
                    triggered.append(g.triggered)

    errors = _run_threads(THREADS, worker)
    assert errors == [], [repr(e) for e in errors]  # in particular no "database is locked"

    k = Karma(led, threshold=50)
    s = k.state()
    assert s.total == THREADS * GRANTS
    assert _rows(led, "karma_events") == THREADS * GRANTS
    assert len(triggered) == 1 and k.requests() == triggered
    assert triggered[0].threshold == 50.0 and triggered[0].karma == 50.0  # opened by the 50th grant
    assert (s.progress, s.open_request) == (THREADS * GRANTS - 50.0, triggered[0])
    assert len(_crossings(led)) == 1
    report = led.verify()
    assert report.ok, report.problems


def test_concurrent_grants_crossing_together_trigger_exactly_once(led, data_root, ledger_url):  # noqa: F811
    barrier = threading.Barrier(THREADS)
    grants: list = []

    def worker(i):
        with Ledger.open(DataRoot(data_root.root), ledger_url) as mine:
            k = Karma(mine, threshold=50)
            barrier.wait()
            grants.append(k.add(7, key=f"g{i}"))  # 8 x 7 = 56: the 8th grant to land crosses 50

    errors = _run_threads(THREADS, worker)
    assert errors == [], [repr(e) for e in errors]
    assert len(grants) == THREADS
    opened = [g.triggered for g in grants if g.triggered is not None]
    assert len(opened) == 1
    k = Karma(led, threshold=50)
    assert k.requests() == opened and len(_crossings(led)) == 1
    assert k.state().total == 56.0 and opened[0].karma == 56.0
    assert led.verify().ok


def test_concurrent_retries_of_one_key_count_once(led, data_root, ledger_url):  # noqa: F811
    barrier = threading.Barrier(THREADS)
    grants: list = []

    def worker(_i):
        with Ledger.open(DataRoot(data_root.root), ledger_url) as mine:
            k = Karma(mine, threshold=50)
            barrier.wait()
            grants.append(k.add(3, key="same-request"))

    errors = _run_threads(THREADS, worker)
    assert errors == [], [repr(e) for e in errors]
    assert sorted(g.duplicate for g in grants) == [False] + [True] * (THREADS - 1)
    assert len({g.id for g in grants}) == 1
    assert Karma(led, threshold=50).state().total == 3.0 and _rows(led, "karma_events") == 1
