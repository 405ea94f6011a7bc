"""Security: a planted secret never surfaces; bearer token; rate limit; repeated errors rate-limited."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import make_error
from gateway.sas import make_sas_token
from gateway.sidecar.logs import RepeatFilter, TextFormatter, setup_logging
from gateway.sidecar.security import MASK, RateLimiter, Redactor, token_matches
from tests.sidecar.fakes import HUB, PLANTED_KEY, Upstream, connection_string, fake_config

SAS = make_sas_token(f"{HUB}/devices/dev-mqtt", PLANTED_KEY, 2_000_000_000)
SIG = SAS.split("sig=")[1].split("&")[0]


def test_redactor_blanks_values_and_shapes():
    r = Redactor([connection_string("a")])
    text = f"cs={connection_string('a')} key={PLANTED_KEY} tok={SAS} auth=Bearer abc.def-123"
    out = r(text)
    assert PLANTED_KEY not in out and SIG not in out and "abc.def-123" not in out and MASK in out
    # a key it was never told about is still caught by its shape
    other = "HostName=h;DeviceId=d;SharedAccessKey=bm90LWNvbmZpZ3VyZWQta2V5"
    assert "bm90LWNvbmZpZ3VyZWQta2V5" not in r(other) and "HostName=h;DeviceId=d" in r(other)
    assert r("nothing secret: 429001 ThrottlingException") == "nothing secret: 429001 ThrottlingException"


def test_token_compare():
    assert token_matches("s3cret", "s3cret")
    assert not token_matches("s3cret", "s3creT") and not token_matches("s3cret", None)
    assert not token_matches("s3cret", "s3cret-and-more")


def test_rate_limiter_bucket():
    now = [0.0]
    limiter = RateLimiter(2.0, 2, clock=lambda: now[0])
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0  # per client
    now[0] += 0.5
    assert limiter.take("a") == 0


def test_repeated_identical_errors_are_rate_limited():
    now = [0.0]
    stream = io.StringIO()
    logger = logging.getLogger("test.repeat")
    handler = logging.StreamHandler(stream)
    handler.addFilter(RepeatFilter(10.0, clock=lambda: now[0]))
    handler.setFormatter(TextFormatter(Redactor()))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        for _ in range(50):
            logger.error("upstream refused: %s", "503001")
        logger.error("upstream refused: %s", "429001")  # a different error still shows
        logger.info("state change")  # info is never suppressed
        logger.info("state change")
        now[0] = 11.0
        logger.error("upstream refused: %s", "503001")
    finally:
        logger.removeHandler(handler)
    lines = [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines == ["upstream refused: 503001", "upstream refused: 429001", "state change", "state change",
                     "upstream refused: 503001 (49 identical suppressed)"]


async def test_planted_secret_never_surfaces(tmp_path: Path, start_sidecar: Any):
    leak = f"boom with {connection_string('dev-mqtt')} and {SAS} and key {PLANTED_KEY}"
    up = Upstream(send_script={"dev-mqtt": [make_error(400004, transport="mqtt", message=leak)]})
    stream = io.StringIO()
    cfg = fake_config(tmp_path, policy={"reconnect": {"initial": 0.05, "cap": 0.05}})
    run = await start_sidecar(cfg, up)
    handler = setup_logging("json", "DEBUG", run.sidecar.redactor, stream=stream)
    try:
        mid = (await (await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x")).json())["id"]
        await run.wait_for(lambda: run.sidecar.outbox.get(mid).status == "dead")  # type: ignore[union-attr]
        # a connection drop whose cause carries the secrets: state, last error, events, logs
        run.upstream.transports["dev-http"].drop(make_error(503001, transport="http", message=leak))
        await run.wait_for(lambda: run.sidecar.pipelines["dev-http"].last_error is not None)
        logging.getLogger("gateway.sidecar").error("direct leak attempt: %s", leak)
        try:
            raise RuntimeError(leak)
        except RuntimeError:
            logging.getLogger("gateway.sidecar").exception("with a traceback")
        outputs = [stream.getvalue()]
        for path in ("/v1/devices", "/v1/devices/dev-mqtt", "/v1/devices/dev-http", f"/v1/messages/{mid}",
                     "/v1/dead-letters", "/metrics"):
            resp = await run.client.get(path)
            outputs.append(await resp.text())
        events = await run.client.get("/v1/events?after=0")
        chunk = b""
        async with asyncio.timeout(5):
            while b"dead_letter" not in chunk or b"503001" not in chunk:
                chunk += await events.content.readany()
        events.close()
        outputs.append(chunk.decode())
        api_error = await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x",
                                          headers={"iothub-messageid": f"{PLANTED_KEY} x"})
        outputs.append(await api_error.text())
    finally:
        logging.getLogger().removeHandler(handler)
    with sqlite3.connect(cfg.outbox_path()) as db:
        outputs.append(json.dumps(db.execute("SELECT reason FROM messages").fetchall()))
    everything = "\n".join(outputs)
    assert "boom with" in everything and MASK in everything  # the leaking errors did get out, redacted
    assert PLANTED_KEY not in everything
    assert SIG not in everything and SAS not in everything
    assert connection_string("dev-mqtt") not in everything


async def test_bearer_token_required_when_configured(tmp_path: Path, start_sidecar: Any):
    cfg = fake_config(tmp_path, api={"host": "0.0.0.0", "token": "a-long-bearer-token"})
    run = await start_sidecar(cfg)
    missing = await run.client.get("/v1/devices")
    assert missing.status == 401 and (await missing.json())["errorCode"] == 401002
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = await run.client.get("/v1/devices", headers={"Authorization": "Bearer a-long-bearer-tokeN"})
    assert wrong.status == 401
    assert "a-long-bearer-token" not in await wrong.text()
    ok = await run.client.get("/v1/devices", headers={"Authorization": "Bearer a-long-bearer-token"})
    assert ok.status == 200
    posted = await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x")
    assert posted.status == 401 and len(run.sidecar.outbox) == 0
    assert (await run.client.get("/healthz")).status == 200 and (await run.client.get("/readyz")).status == 200


async def test_rate_limit_answers_429_with_retry_after(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path, api={"rate_limit": 0.5, "rate_burst": 3}))
    statuses = [(await run.client.get("/v1/codes/429001")).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    limited = await run.client.get("/v1/devices")
    assert limited.status == 429 and (await limited.json())["errorCode"] == 429001
    assert int(limited.headers["Retry-After"]) >= 1


# --- minted tokens, echoed signatures, weak tokens (issue 13) ------------------------------------------


def test_every_minted_token_and_signature_is_blanked_in_any_spelling():
    from urllib.parse import quote, quote_plus, unquote

    token = make_sas_token(f"{HUB}/devices/minted", PLANTED_KEY, 2_100_000_000)
    sig = unquote(token.split("sig=")[1].split("&")[0])
    r = Redactor()  # told nothing: the registry in gateway.sas knows what was minted
    for form in (sig, quote(sig, safe=""), quote_plus(sig), token):
        out = r(f"the hub said: bad signature '{form}' here")
        assert form not in out and MASK in out, form
    assert r("an unrelated message") == "an unrelated message"


def test_a_signature_shaped_value_next_to_sr_or_se_is_blanked_even_if_not_minted():
    import base64

    foreign = base64.b64encode(bytes(range(32))).decode()  # 44 characters, the shape of an HMAC-SHA256
    r = Redactor(minted=False)
    out = r(f"signature {foreign} does not match sr=hub%2Fdevices%2Fd&se=2000000000")
    assert foreign not in out and MASK in out
    assert foreign in r(f"a base64 value {foreign} with no token around it")


def test_the_minted_registry_is_bounded():
    from gateway import sas

    registry = sas._MintedSecrets(limit=3)
    for n in range(10):
        registry.add(f"value-{n}")
    version, values = registry.snapshot()
    assert values == ("value-7", "value-8", "value-9") and version == 10


@pytest.mark.parametrize("token", ["", "short", "s3cret", "elevenchars", "aaaaaaaaaaaaaaaa", "has space inside",
                                   "non-ascii-tökenvalue"])
def test_weak_bearer_tokens_are_refused_at_start(token: str):
    from gateway.sidecar.config import ConfigError, parse_config

    if not token:
        return  # an empty value is refused as missing already
    with pytest.raises(ConfigError, match="too weak"):
        parse_config({"api": {"token_env": "TOK"}}, env={"TOK": token})
    assert parse_config({"api": {"token_env": "TOK"}}, env={"TOK": "a-strong-token-1"}).api.token is not None


def test_token_compare_never_raises_on_undecodable_input():
    assert not token_matches("a-strong-token-1", "a-strong-token-1\udcff")
    assert not token_matches("a-strong-token-1", "\ud800")
    assert token_matches("a-strong-token-1", "a-strong-token-1")


def test_a_secret_is_blanked_as_json_spells_it():
    token = 'a-"quoted"\\token-é'
    r = Redactor([token])
    out = r(json.dumps({"message": f"got {token}"}))
    assert "quoted" not in out and MASK in out


def test_an_unformattable_log_record_never_reaches_stderr_unredacted(capsys: Any):
    from gateway.sidecar.logs import JsonFormatter

    stream = io.StringIO()
    logger = logging.getLogger("test.unformattable")
    logger.propagate = False  # only our handlers: pytest's own capture would raise on the bad record
    for formatter in (TextFormatter(Redactor([PLANTED_KEY])), JsonFormatter(Redactor([PLANTED_KEY]))):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        try:
            logger.warning("bad %d template", PLANTED_KEY)  # a TypeError while formatting
        finally:
            logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert PLANTED_KEY not in err and PLANTED_KEY not in stream.getvalue()
    assert stream.getvalue().count("(unformattable log message)") == 2
