"""The fake Bot API speaks the real protocol: the tests that lean on it are only as good as it is."""

from __future__ import annotations

import threading

import httpx
import pytest

from bot.testing.env import TOKEN
from bot.testing.fake_telegram import FakeTelegram, FloodLimits


def call(root: str, method: str, token: str = TOKEN, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{root}/bot{token}/{method}", timeout=10, **kwargs)  # type: ignore[arg-type]


def test_parameters_arrive_by_json_form_or_query(fake: FakeTelegram, telegram_root: str) -> None:
    call(telegram_root, "sendMessage", json={"chat_id": 1, "text": "json"})
    call(telegram_root, "sendMessage", data={"chat_id": "2", "text": "form"})
    call(telegram_root, "sendMessage", params={"chat_id": "3", "text": "query"})
    assert [(c.params["chat_id"], c.params["text"]) for c in fake.calls("sendMessage")] == [
        (1, "json"),
        ("2", "form"),
        ("3", "query"),
    ]


@pytest.mark.parametrize(
    ("token", "method", "status", "description"),
    [
        ("not-a-token", "getMe", 401, "Unauthorized"),
        (TOKEN, "noSuchMethod", 404, "Not Found: method not found"),
        (TOKEN, "sendMessage", 400, "Bad Request: chat_id is required"),
    ],
)
def test_errors_look_like_the_real_api(
    telegram_root: str, token: str, method: str, status: int, description: str
) -> None:
    response = call(telegram_root, method, token=token, json={})
    assert response.status_code == status
    assert response.json() == {"ok": False, "error_code": status, "description": description}


def test_get_updates_confirms_by_offset_and_refuses_while_a_webhook_is_set(
    fake: FakeTelegram, telegram_root: str
) -> None:
    for update_id in (10, 11, 12):
        fake.push_update({"update_id": update_id})
    assert [u["update_id"] for u in call(telegram_root, "getUpdates", json={}).json()["result"]] == [
        10,
        11,
        12,
    ]
    assert [
        u["update_id"] for u in call(telegram_root, "getUpdates", json={"offset": 12}).json()["result"]
    ] == [12]
    call(telegram_root, "setWebhook", json={"url": "https://example.com/webhook"})
    conflict = call(telegram_root, "getUpdates", json={})
    assert conflict.status_code == 409
    call(telegram_root, "deleteWebhook", json={})
    assert call(telegram_root, "getUpdates", json={}).status_code == 200


def test_long_polling_wakes_up_when_an_update_arrives(fake: FakeTelegram, telegram_root: str) -> None:
    timer = threading.Timer(0.3, fake.push_update, args=({"update_id": 1},))
    timer.start()
    result = call(telegram_root, "getUpdates", json={"timeout": 10}).json()["result"]
    timer.join()
    assert [u["update_id"] for u in result] == [1]


def test_injected_failures_come_once_each_then_calls_succeed(fake: FakeTelegram, telegram_root: str) -> None:
    fake.fail_next("sendMessage", times=2, error_code=429, description="Too Many Requests", retry_after=3)
    first = call(telegram_root, "sendMessage", json={"chat_id": 1, "text": "x"})
    assert first.status_code == 429
    assert first.json()["parameters"] == {"retry_after": 3}
    assert call(telegram_root, "sendMessage", json={"chat_id": 1, "text": "x"}).status_code == 429
    assert call(telegram_root, "sendMessage", json={"chat_id": 1, "text": "x"}).json()["ok"] is True


def test_wait_for_sees_calls_made_from_another_thread(fake: FakeTelegram, telegram_root: str) -> None:
    sender = threading.Timer(
        0.2, call, args=(telegram_root, "sendMessage"), kwargs={"json": {"chat_id": 5, "text": "hi"}}
    )
    sender.start()
    fake.wait_for(lambda: len(fake.sent_messages(5)) == 1, timeout=10)
    sender.join()
    with pytest.raises(TimeoutError):
        fake.wait_for(lambda: len(fake.sent_messages(5)) == 2, timeout=0.3)


def test_a_failure_can_target_one_chat(fake: FakeTelegram, telegram_root: str) -> None:
    fake.fail_next("sendMessage", error_code=429, description="Too Many Requests", retry_after=7, chat_id=5)
    assert call(telegram_root, "sendMessage", json={"chat_id": 6, "text": "x"}).status_code == 200
    refused = call(telegram_root, "sendMessage", json={"chat_id": 5, "text": "x"})
    assert refused.status_code == 429
    assert refused.json()["parameters"] == {"retry_after": 7}
    assert call(telegram_root, "sendMessage", json={"chat_id": 5, "text": "x"}).status_code == 200
    assert [c.params["chat_id"] for c in fake.delivered()] == [6, 5]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("chat_id", "allowed", "window"),
    [(7, 1, 1.0), (-100, 20, 60.0)],
    ids=["private chat: 1 a second", "group: 20 a minute"],
)
def test_flood_limits_refuse_with_429_per_chat(
    fake: FakeTelegram, telegram_root: str, chat_id: int, allowed: int, window: float
) -> None:
    fake.clock = clock = Clock()
    fake.flood_limits = FloodLimits(retry_after=3)
    answers = [
        call(telegram_root, "sendMessage", json={"chat_id": chat_id, "text": "x"}) for _ in range(allowed + 1)
    ]
    assert [a.status_code for a in answers] == [200] * allowed + [429]
    assert answers[-1].json()["parameters"] == {"retry_after": 3}
    assert call(telegram_root, "sendMessage", json={"chat_id": chat_id + 1, "text": "x"}).status_code == 200
    clock.now += window
    assert call(telegram_root, "sendMessage", json={"chat_id": chat_id, "text": "x"}).status_code == 200
    assert len(fake.delivered(chat_id)) == allowed + 1


def test_flood_limits_refuse_the_31st_send_of_a_second(fake: FakeTelegram, telegram_root: str) -> None:
    fake.clock = clock = Clock()
    fake.flood_limits = FloodLimits()
    statuses = [
        call(telegram_root, "sendMessage", json={"chat_id": 1 + n, "text": "x"}).status_code
        for n in range(31)
    ]
    assert statuses == [200] * 30 + [429]
    clock.now += 1
    assert call(telegram_root, "sendMessage", json={"chat_id": 99, "text": "x"}).status_code == 200


@pytest.mark.parametrize(
    ("params", "description"),
    [
        ({"url": "http://example.com/webhook"}, "An HTTPS URL must be provided"),
        ({"url": "https://example.com/webhook", "secret_token": "has space"}, "unallowed characters"),
        ({"url": "https://example.com/webhook", "max_connections": 101}, "between 1 and 100"),
    ],
)
def test_set_webhook_refuses_what_telegram_refuses(
    fake: FakeTelegram, telegram_root: str, params: dict[str, object], description: str
) -> None:
    response = call(telegram_root, "setWebhook", json=params)
    assert response.status_code == 400
    assert description in response.json()["description"]
    assert fake.webhook == {}


def test_webhook_info_reports_the_last_delivery_error_and_pending_updates(
    fake: FakeTelegram, telegram_root: str
) -> None:
    call(telegram_root, "setWebhook", json={"url": "https://example.com/webhook", "max_connections": 7})
    fake.webhook_failed("Wrong response from the webhook: 401 Unauthorized", at=1_700_000_000)
    fake.push_update({"update_id": 1})
    info = call(telegram_root, "getWebhookInfo").json()["result"]
    assert info["url"] == "https://example.com/webhook"
    assert info["max_connections"] == 7
    assert info["pending_update_count"] == 1
    assert info["last_error_date"] == 1_700_000_000
    assert info["last_error_message"] == "Wrong response from the webhook: 401 Unauthorized"
    fake.reset()
    assert "last_error_message" not in call(telegram_root, "getWebhookInfo").json()["result"]
