"""
What ``twistd --logger acexy_tw.logs.observer`` writes (issue #14, point 2):
with ``ACEXY_LOG_FORMAT=json`` one plain JSON object per line (time, level,
logger, message, traceback as text, the event's own fields, secrets
redacted as the text format redacts them); text lines exactly as Twisted's
``textFileLogObserver`` writes them, redacted; and an observer that writes
to twistd's ``--logfile`` itself, so SIGHUP still finds and reopens it.
"""

from __future__ import annotations

import io
import json
import os
import sys

from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent, textFileLogObserver
from twisted.python import log as legacy_log
from twisted.python import logfile
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw import _twisted_compat as compat
from acexy_tw import logs

TOKEN = "s3cr&t-T0ken"
QUOTED = "s3cr%26t-T0ken"
#: 2026-12-01T10:58:28.123Z
WHEN = 1796122708.1234


def events_of(emit) -> list[dict]:
    """The events ``emit(log)`` sends through a Logger of namespace ``acexy_tw.test``."""
    seen: list[dict] = []
    emit(Logger(namespace="acexy_tw.test", observer=seen.append))
    for event in seen:
        event["log_time"] = WHEN
    return seen


def one_event(emit) -> dict:
    [event] = events_of(emit)
    return event


def as_json(event: dict) -> dict:
    line = logs.format_json(event)
    assert line is not None
    assert line.endswith("\n") and line.count("\n") == 1, repr(line)
    assert "\x1e" not in line
    return json.loads(line)


class JSONLineTests(SynchronousTestCase):
    def test_the_fixed_keys(self) -> None:
        line = as_json(one_event(lambda log: log.info("serving on {where}", where="127.0.0.1:8080")))
        self.assertEqual(
            line,
            {
                "time": "2026-12-01T10:58:28.123Z",
                "level": "info",
                "logger": "acexy_tw.test",
                "message": "serving on 127.0.0.1:8080",
                "where": "127.0.0.1:8080",
            },
        )
        self.assertEqual(list(line)[:4], ["time", "level", "logger", "message"])

    def test_every_level_is_its_name(self) -> None:
        for level in LogLevel.iterconstants():
            event = one_event(lambda log: log.emit(level, "x"))
            self.assertEqual(as_json(event)["level"], level.name)
        self.assertEqual(
            {level.name for level in LogLevel.iterconstants()}, {"debug", "info", "warn", "error", "critical"}
        )

    def test_an_event_without_level_namespace_or_time(self) -> None:
        line = as_json({"log_format": "bare"})
        self.assertEqual(line, {"time": None, "level": "info", "logger": "-", "message": "bare"})

    def test_the_message_is_formatEvents_rendering(self) -> None:
        event = one_event(lambda log: log.warn("{n:.1f} s, {who!r}, {{braces}}", n=2.25, who="me"))
        self.assertEqual(as_json(event)["message"], formatEvent(event))
        self.assertEqual(as_json(event)["message"], "2.2 s, 'me', {braces}")

    def test_a_bad_format_is_still_a_line(self) -> None:
        event = one_event(lambda log: log.info("{missing}"))
        line = as_json(event)
        self.assertIn("Unable to format event", line["message"])
        self.assertEqual(line["level"], "info")

    def test_nothing_to_say_is_no_line_as_in_the_text_format(self) -> None:
        for event in ({}, {"log_format": "", "log_level": LogLevel.info}):
            self.assertIsNone(logs.format_json(event))
            self.assertIsNone(logs.format_text(event))

    def test_twisteds_own_keys_are_left_out_and_fixed_keys_not_overwritten(self) -> None:
        event = one_event(
            lambda log: log.info("{message} at {time}", message="hello", time=3, logger="y", own=1)
        )
        event.update({"log_io": "io", "level": "x", "traceback": "t", "system": "s"})
        line = as_json(event)
        self.assertEqual(line["message"], "hello at 3")
        self.assertEqual((line["level"], line["logger"], line["own"]), ("info", "acexy_tw.test", 1))
        self.assertFalse([key for key in line if key.startswith("log_")], line)
        self.assertFalse({"traceback", "system"} & set(line), line)

    def test_a_failure_is_a_traceback_string_never_the_failure(self) -> None:
        def emit(log: Logger) -> None:
            try:
                raise ValueError("boom")
            except ValueError:
                log.failure("request for {id} failed", id="abc")

        event = one_event(emit)
        line = as_json(event)
        self.assertEqual(line["level"], "critical")
        self.assertEqual(line["message"], "request for abc failed")
        self.assertIsInstance(line["traceback"], str)
        self.assertIn("Traceback (most recent call last):", line["traceback"])
        self.assertIn("ValueError: boom", line["traceback"])
        self.assertEqual(line["id"], "abc")
        self.assertNotIn("failure", line)

    def test_a_failure_at_error_level_keeps_its_level(self) -> None:
        event = one_event(lambda log: log.failure("x", Failure(KeyError("k")), level=LogLevel.error))
        line = as_json(event)
        self.assertEqual(line["level"], "error")
        self.assertIn("KeyError", line["traceback"])

    def test_an_unprintable_traceback_is_said_so(self) -> None:
        class Broken(Failure):
            def getTraceback(self, *a: object, **kw: object) -> str:
                raise RuntimeError("no frames")

        event = one_event(lambda log: log.failure("x", Broken(KeyError("k"))))
        self.assertIn("UNABLE TO OBTAIN TRACEBACK", as_json(event)["traceback"])

    def test_old_api_events(self) -> None:
        seen: list[dict] = []
        publisher = LogPublisher(seen.append)
        # what twisted.python.log hands the new publisher (legacy_log.msg/err)
        legacy = legacy_log.LogPublisher(publisher, publisher)
        legacy.msg("hello", "world", extra=1)
        try:
            raise ZeroDivisionError("zero")
        except ZeroDivisionError:
            legacy.msg(failure=Failure(), why="Unhandled Error Processing Request.", isError=1)
            legacy.msg(failure=Failure(), why=None, isError=1)
        hello, why, bare = (as_json(event) for event in seen)
        self.assertEqual((hello["message"], hello["level"], hello["extra"]), ("hello world", "info", 1))
        self.assertEqual(hello["logger"], "log_legacy")
        self.assertFalse({"isError", "format", "why", "failure"} & set(hello), hello)
        self.assertEqual((why["message"], why["level"]), ("Unhandled Error Processing Request.", "critical"))
        self.assertIn("ZeroDivisionError: zero", why["traceback"])
        self.assertNotIn("Traceback", why["message"])
        self.assertEqual(bare["message"], "Unhandled Error")
        self.assertIn("ZeroDivisionError", bare["traceback"])

    def test_the_system_when_there_is_one(self) -> None:
        event = one_event(lambda log: log.info("x"))
        event["log_system"] = "HTTPChannel,0,127.0.0.1"
        self.assertEqual(as_json(event)["system"], "HTTPChannel,0,127.0.0.1")
        event["log_system"] = "-"
        self.assertNotIn("system", as_json(event))

    def test_fields_json_cannot_hold_are_reprd(self) -> None:
        class Thing:
            def __repr__(self) -> str:
                return "<Thing 7>"

        class Unrepresentable:
            def __repr__(self) -> str:
                raise RuntimeError("no")

        loop: list = [1]
        loop.append(loop)
        event = one_event(
            lambda log: log.info(
                "x",
                thing=Thing(),
                bad=Unrepresentable(),
                nan=float("nan"),
                inf=float("-inf"),
                data=b"GET /a\xff",
                ids={3, 3},
                nested={1: [True, None, 1.5, (2, "two")]},
                loop=loop,
            )
        )
        line = as_json(event)
        self.assertEqual(line["thing"], "<Thing 7>")
        self.assertEqual(line["bad"], "<unrepresentable Unrepresentable>")
        self.assertEqual((line["nan"], line["inf"]), ("nan", "-inf"))
        self.assertEqual(line["data"], "GET /a\\xff")
        self.assertEqual(line["ids"], "{3}")
        self.assertEqual(line["nested"], {"1": [True, None, 1.5, [2, "two"]]})
        self.assertEqual(line["loop"][:1], [1])  # followed a few levels, then repr'd

    def test_an_event_that_cannot_be_written_is_still_a_line(self) -> None:
        class Key:
            def __str__(self) -> str:
                raise RuntimeError("no key")

            def __repr__(self) -> str:
                return "Key()"

        event = one_event(lambda log: log.info("x", data={Key(): 1}))
        line = as_json(event)
        self.assertEqual((line["level"], line["logger"]), ("error", "acexy_tw.logs"))
        self.assertIn("unformattable log event", line["message"])
        self.assertIn("no key", line["message"])

    def test_unicode_round_trips_in_an_ascii_line(self) -> None:
        text = "café ✓ 🎬 Ω \udcff"
        event = one_event(lambda log: log.info("title {t}", t=text, **{"clé": text}))
        raw = logs.format_json(event)
        assert raw is not None
        self.assertTrue(raw.isascii())
        line = json.loads(raw)
        self.assertEqual(line["message"], "title " + text)
        self.assertEqual((line["t"], line["clé"]), (text, text))
        # what a file observer encodes: never an encoding error
        self.assertEqual(raw.encode("utf-8").decode("ascii"), raw)

    def test_control_characters_never_break_the_line(self) -> None:
        nasty = "a\nb\r\nc\x00d\x1b[31me\x7ff\x1eg\x85h\u2028i\u2029j\tk"
        event = one_event(lambda log: log.info("said {s}", s=nasty))
        raw = logs.format_json(event)
        assert raw is not None
        self.assertEqual(raw.count("\n"), 1)
        self.assertTrue(raw.endswith("\n"))
        body = raw[:-1]
        self.assertTrue(all(" " <= ch <= "~" for ch in body), repr(body))  # printable ASCII only
        line = json.loads(raw)
        self.assertEqual((line["message"], line["s"]), ("said " + nasty, nasty))


class RedactionTests(SynchronousTestCase):
    """The JSON lines redact what the text lines do (``logs.redact``), in every string."""

    def test_tokens_and_bearer_credentials_everywhere(self) -> None:
        uri = f"/ace/getstream?id=abc&token={QUOTED}&x=1"

        def emit(log: Logger) -> None:
            try:
                raise ValueError(f"refused {uri}")
            except ValueError:
                log.failure(
                    "GET {uri} from {peer}",
                    uri=uri,
                    peer="127.0.0.1",
                    raw=uri.encode(),
                    headers={"Authorization": f"Bearer {TOKEN}", "x": [f"tok%65n={QUOTED}"]},
                    req=_WithRepr(f"<Request GET {uri}>"),
                )

        event = one_event(emit)
        raw = logs.format_json(event)
        assert raw is not None
        text = logs.format_text(event)
        assert text is not None
        for shown in (raw, text):
            self.assertNotIn(TOKEN, shown)
            self.assertNotIn(QUOTED, shown)
        line = json.loads(raw)
        wanted = "/ace/getstream?id=abc&token=<redacted>&x=1"
        self.assertEqual(line["message"], f"GET {wanted} from 127.0.0.1")
        self.assertEqual((line["uri"], line["raw"]), (wanted, wanted))
        self.assertEqual(line["headers"], {"Authorization": "Bearer <redacted>", "x": ["tok%65n=<redacted>"]})
        self.assertEqual(line["req"], f"<Request GET {wanted}>")
        self.assertIn(f"refused {wanted}", line["traceback"])
        self.assertEqual(line["message"], logs.redact(formatEvent(event)))

    def test_the_orchestrators_api_key_as_it_is_sent(self) -> None:
        key = "0123456789abcdef-api-key"
        event = one_event(lambda log: log.debug("POST {url} {h}", url="http://orch/provision", h=f"Authorization: Bearer {key}"))
        raw = logs.format_json(event)
        assert raw is not None
        self.assertNotIn(key, raw)
        self.assertEqual(json.loads(raw)["h"], "Authorization: Bearer <redacted>")

    def test_a_token_with_quotes_and_backslashes_keeps_the_line_valid(self) -> None:
        # Each string is redacted before it is encoded, so no escape can be cut in half.
        for secret in ('ab"cd', "ab\\", 'x\\"y', "ab\\\\"):
            uri, header = f"/a?token={secret} rest", f"Bearer {secret}"
            event = one_event(lambda log: log.info("{u}", u=uri, b=header))
            line = as_json(event)
            self.assertEqual((line["message"], line["u"], line["b"]), (logs.redact(uri), logs.redact(uri), logs.redact(header)))
            self.assertTrue(line["u"].startswith("/a?token=<redacted>"), line["u"])
            self.assertTrue(line["b"].startswith("Bearer <redacted>"), line["b"])


class _WithRepr:
    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text


class TextLineTests(SynchronousTestCase):
    def _both(self, event: dict) -> tuple[str, str]:
        ours, theirs = io.StringIO(), io.StringIO()
        logs.observer_for(ours, "text")(event)
        textFileLogObserver(theirs)(event)
        return ours.getvalue(), theirs.getvalue()

    def test_byte_for_byte_twisteds_text_line(self) -> None:
        def emit(log: Logger) -> None:
            log.info("serving on {where}", where="127.0.0.1:8080")
            log.warn("café\nsecond line")
            try:
                1 / 0
            except ZeroDivisionError:
                log.failure("boom")

        for event in events_of(emit) + [{"log_format": "x", "log_system": "HTTPChannel,0,1.2.3.4"}]:
            ours, theirs = self._both(event)
            self.assertEqual(ours, theirs)
            self.assertTrue(ours)

    def test_redacted_otherwise_the_same(self) -> None:
        event = one_event(lambda log: log.info("GET {uri}", uri=f"/x?token={QUOTED}"))
        ours, theirs = self._both(event)
        self.assertIn(QUOTED, theirs)
        self.assertEqual(ours, logs.redact(theirs))
        self.assertIn("token=<redacted>", ours)


class ObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(logs, "observer_installed", False)
        self.patch(logs, "_configured", {})
        self.out = io.StringIO()
        self.patch(sys, "stdout", self.out)

    def _environ(self, **values: str) -> None:
        environ = {k: v for k, v in os.environ.items() if k != "ACEXY_LOG_FORMAT"}
        self.patch(os, "environ", {**environ, **values})

    def _log_through(self, observer: object) -> None:
        Logger(namespace="acexy_tw.test", observer=LogPublisher(observer)).info("hello {who}", who="you")

    def test_json_from_the_environment_to_stdout(self) -> None:
        self._environ(ACEXY_LOG_FORMAT=" JSON ")
        self._log_through(logs.observer())
        self.assertTrue(logs.observer_installed)
        [line] = self.out.getvalue().splitlines()
        self.assertEqual(json.loads(line)["message"], "hello you")
        self.assertEqual(json.loads(line)["who"], "you")

    def test_text_by_default_and_for_anything_else(self) -> None:
        for values in ({}, {"ACEXY_LOG_FORMAT": "yaml"}):
            self._environ(**values)
            self._log_through(logs.observer())
        lines = self.out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(all(line.endswith("[acexy_tw.test#info] hello you") for line in lines), lines)

    def test_configure_picks_the_format_and_twistds_logfile(self) -> None:
        self._environ(ACEXY_LOG_FORMAT="text")
        path = os.path.join(os.path.abspath(self.mktemp()), "acexy.log")
        os.makedirs(os.path.dirname(path))
        logs.configure("json", {"logfile": path, "nodaemon": True})  # twistd's ServerOptions is a dict
        observer = logs.observer()
        self._log_through(observer)
        self.assertEqual(self.out.getvalue(), "")
        [found] = compat.log_files(LogPublisher(observer))
        self.addCleanup(found.close)
        self.assertEqual(logs._configured, {})  # used once: the next observer is the environment's
        with open(path, encoding="utf-8") as f:
            [line] = f.read().splitlines()
        self.assertEqual(json.loads(line)["message"], "hello you")

    def test_configure_with_stdout(self) -> None:
        self._environ()
        for options in (None, {"logfile": "-"}, {"logfile": None}):
            logs.configure("json", options)
            self._log_through(logs.observer())
        self.assertEqual([json.loads(line)["message"] for line in self.out.getvalue().splitlines()], ["hello you"] * 3)


class LogFileTests(SynchronousTestCase):
    """SIGHUP (``AcexyService.reopen_logs``) finds the JSON observer's file and reopens it."""

    def test_a_json_logfile_is_found_and_reopened(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        f = logfile.LogFile("acexy.log", directory, rotateLength=None)
        self.addCleanup(f.close)
        publisher = LogPublisher(logs.observer_for(f, "json"))
        self.assertEqual(compat.log_files(publisher), [f])
        log = Logger(namespace="acexy_tw.test", observer=publisher)
        log.info("before")
        os.rename(f.path, f.path + ".1")
        f.reopen()
        log.info("after")
        with open(f.path + ".1", encoding="utf-8") as old, open(f.path, encoding="utf-8") as new:
            self.assertEqual([json.loads(line)["message"] for line in old], ["before"])
            self.assertEqual([json.loads(line)["message"] for line in new], ["after"])


class ReadmeTests(SynchronousTestCase):
    def test_the_readmes_example_line_is_what_format_json_writes(self) -> None:
        from pathlib import Path

        readme = (Path(__file__).resolve().parents[2] / "README.rst").read_text(encoding="utf-8")
        [shown] = [line.strip() for line in readme.splitlines() if line.strip().startswith('{"time": ')]
        example = json.loads(shown)
        event = one_event(
            lambda log: log.info(
                "engine session for {key} closed ({reason}); {n} open", key=example["key"], reason=example["reason"], n=0
            )
        )
        event["log_namespace"] = example["logger"]
        event["log_time"] = 1796122954.9901  # 2026-12-01T11:02:34.990Z
        line = logs.format_json(event)
        self.assertEqual(line, shown + "\n")


class LevelTests(SynchronousTestCase):
    """ACEXY_LOG_LEVEL: what set_level lets through from acexy_tw's loggers."""

    def _emitted(self, level: str) -> list[str]:
        from twisted.logger import globalLogPublisher

        from acexy_tw.logs import get_logger, set_level

        seen: list[str] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "acexy_tw.test_level":
                seen.append(event["log_level"].name)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.addCleanup(set_level, "info")
        set_level(level)
        log = get_logger("acexy_tw.test_level")
        log.debug("d")
        log.info("i")
        log.warn("w")
        log.error("e")
        return seen

    def test_each_level_lets_through_itself_and_above(self) -> None:
        self.assertEqual(self._emitted("debug"), ["debug", "info", "warn", "error"])
        self.assertEqual(self._emitted("info"), ["info", "warn", "error"])
        self.assertEqual(self._emitted("warn"), ["warn", "error"])
        self.assertEqual(self._emitted("error"), ["error"])
