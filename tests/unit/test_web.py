"""The HTTP surface: routes, methods, acexy's 400 texts, /ace/status."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.testing import CID, CID2, InMemoryProxy, ts


class GetstreamRouteTests(SynchronousTestCase):
    def test_no_selector_is_400_with_acexy_text(self) -> None:
        p = InMemoryProxy()
        c = p.connect(b"/ace/getstream")
        self.assertEqual(c.status(), 400)
        self.assertIn(b"one of `id` or `infohash` must have a value", c.value())
        self.assertEqual(p.engine.starts, [])

    def test_two_selectors_is_400_with_acexy_text(self) -> None:
        p = InMemoryProxy()
        c = p.connect(b"/ace/getstream?id=" + CID.encode() + b"&infohash=" + CID2.encode())
        self.assertEqual(c.status(), 400)
        self.assertIn(b"only one of `id` or `infohash` can have a value", c.value())
        self.assertEqual(p.engine.starts, [])

    def test_bad_id_costs_nothing(self) -> None:
        p = InMemoryProxy()
        c = p.connect(b"/ace/getstream?id=../../etc/passwd")
        self.assertEqual(c.status(), 400)
        self.assertEqual(p.engine.starts, [])

    def test_head_answers_ts_without_touching_an_engine(self) -> None:
        p = InMemoryProxy()
        c = p.connect(b"/ace/getstream?id=" + CID.encode(), method=b"HEAD")
        self.assertEqual(c.status(), 200)
        self.assertIn(b"video/mp2t", c.value().lower())
        self.assertEqual(p.engine.starts, [])
        self.assertEqual(len(p.registry), 0)

    def test_trailing_slash_route(self) -> None:
        p = InMemoryProxy()
        c = p.connect(b"/ace/getstream/?id=" + CID.encode())
        p.engine.response.data(ts(1))
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), ts(1))

    def test_infohash_selector_goes_to_the_engine_as_infohash(self) -> None:
        p = InMemoryProxy()
        p.connect(b"/ace/getstream?infohash=" + CID.encode())
        key = p.engine.starts[0][0]
        self.assertEqual(key.engine_params(), [("infohash", CID)])

    def test_client_pid_is_ignored_and_extras_pass_through(self) -> None:
        p = InMemoryProxy()
        p.connect(b"/ace/getstream?id=" + CID.encode() + b"&pid=player1&transcode_audio=1")
        p.connect(b"/ace/getstream?id=" + CID.encode() + b"&pid=player2&transcode_audio=1")
        self.assertEqual(len(p.engine.starts), 1)  # the pid does not split sessions
        params = dict(p.engine.starts[0][0].engine_params())
        self.assertNotIn("pid", params)
        self.assertEqual(params["transcode_audio"], "1")

    def test_other_method_is_405(self) -> None:
        p = InMemoryProxy()
        c = p.connect(b"/ace/getstream?id=" + CID.encode(), method=b"POST")
        self.assertEqual(c.status(), 405)
        self.assertEqual(p.engine.starts, [])

    def test_unknown_path_is_404(self) -> None:
        p = InMemoryProxy()
        self.assertEqual(p.connect(b"/nope").status(), 404)


class StatusRouteTests(SynchronousTestCase):
    def test_status_counts_streams(self) -> None:
        p = InMemoryProxy()
        doc = json.loads(p.connect(b"/ace/status").body())
        self.assertEqual(doc["streams"], 0)
        p.connect()
        p.connect()
        p.connect(b"/ace/getstream?id=" + CID2.encode())
        doc = json.loads(p.connect(b"/ace/status").body())
        self.assertEqual(doc["streams"], 2)
        self.assertEqual(doc["clients"], 3)

    def test_status_of_one_stream(self) -> None:
        p = InMemoryProxy()
        p.connect()
        p.connect()
        p.engine.response.data(ts(2))
        c = p.connect(b"/ace/status?id=" + CID.upper().encode())
        self.assertEqual(c.status(), 200)
        doc = json.loads(c.body())
        self.assertEqual(doc["clients"], 2)
        self.assertEqual(doc["stream_id"], CID.upper())
        self.assertTrue(doc["stat_url"].startswith("http://engine:6878/ace/stat/"))
        self.assertEqual(doc["bytes_in"], 2 * 188)
        self.assertEqual(doc["bytes_out"], 4 * 188)
        self.assertEqual(doc["engine"], "http://engine:6878")
        self.assertEqual(len(doc["client_list"]), 2)

    def test_unknown_stream_is_404(self) -> None:
        p = InMemoryProxy()
        c = p.connect(b"/ace/status?id=" + CID.encode())
        self.assertEqual(c.status(), 404)
        self.assertIn(b"Stream not found", c.value())


class DashboardRouteTests(SynchronousTestCase):
    def test_dashboard_is_served_at_the_root_with_a_strict_policy(self) -> None:
        p = InMemoryProxy()
        c = p.connect(b"/")
        self.assertEqual(c.status(), 200)
        head = c.value().partition(b"\r\n\r\n")[0].lower()
        self.assertIn(b"content-type: text/html", head)
        self.assertIn(b"content-security-policy:", head)
        self.assertIn(b"<html", c.body().lower())


STOP = b"/ace/stop?id=" + CID.encode()


PLAYLIST = b"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n/ace/c/x/1.ts\n"


def hls_session(p: InMemoryProxy, cid: str = CID):
    """An HLS session of ``cid`` the engine accepted and served a playlist of
    (as a player's first poll makes; the scripted engine answers ``fetch``)."""
    from twisted.internet.defer import succeed

    from acexy_tw.testing import key

    p.engine.fetch = lambda url: succeed((200, PLAYLIST))
    session = p.hls.for_key(key(cid))
    session.ready()
    session.playlist()
    return session


def record_releases(p: InMemoryProxy) -> list:
    """Every ``placement.release(key, hls=...)`` from now on, as (key, hls)."""
    released: list = []
    release = p.placement.release

    def recording(key, *, hls=False):
        released.append((key, hls))
        return release(key, hls=hls)

    p.placement.release = recording  # the instance's own: what the registry and HlsSessions call
    return released


class StopRouteTests(SynchronousTestCase):
    """POST /ace/stop?id=: every engine session of the content ends through its close path."""

    def test_players_get_a_clean_end_and_the_engine_its_stop(self) -> None:
        p = InMemoryProxy(linger=30)
        players = [p.connect(), p.connect()]
        p.engine.response.data(ts(3))
        [session] = list(p.registry)
        released = record_releases(p)
        c = p.connect(STOP, method=b"POST")
        self.assertEqual(c.status(), 204)
        for player in players:
            self.assertTrue(player.finished_cleanly())  # the chunked end, as any session end
            self.assertFalse(player.aborted)
            self.assertEqual(player.body(), ts(3))
        self.assertEqual(p.engine.stops, [session.info or p.engine.info(0)])  # its stop command
        self.assertEqual(p.engine.response.transport.producerState, "stopped")  # playback connection closed
        self.assertEqual(len(p.registry), 0)
        self.assertEqual(session.close_reason, "stopped")
        self.assertEqual(p.registry.describe()["stopped"], {"stopped": 1})
        self.assertEqual(released, [(session.key, False)])  # the reservation is released
        page = p.connect(b"/metrics").body().decode()
        self.assertIn('acexy_engine_sessions_stopped_total{reason="stopped"} 1.0', page)
        self.assertEqual(json.loads(p.connect(b"/ace/status").body())["sessions"], [])

    def test_acestream_scheme_any_case_and_every_variant(self) -> None:
        p = InMemoryProxy()
        plain = p.connect()
        variant = p.connect(b"/ace/getstream?id=" + CID.encode() + b"&transcode_audio=1")
        other = p.connect(b"/ace/getstream?id=" + CID2.encode())
        p.engine.response.data(ts(1))
        c = p.connect(b"/ace/stop?id=acestream://" + CID.upper().encode(), method=b"POST")
        self.assertEqual(c.status(), 204)
        self.assertTrue(plain.finished_cleanly() and variant.finished_cleanly())
        self.assertFalse(other.finished_cleanly())
        self.assertEqual([str(s.key) for s in p.registry], [CID2])
        self.assertEqual(len(p.engine.stops), 2)

    def test_a_player_still_waiting_for_the_engine_gets_an_http_error(self) -> None:
        p = InMemoryProxy()
        p.engine.auto = False
        player = p.connect()
        self.assertEqual(p.connect(STOP, method=b"POST").status(), 204)
        self.assertEqual(player.status(), 502)
        self.assertIn(b"stopped on the proxy", player.body())
        self.assertEqual(len(p.registry), 0)

    def test_hls_sessions_of_the_content_are_stopped_too(self) -> None:
        p = InMemoryProxy()
        player = p.connect()
        session = hls_session(p)
        kept = hls_session(p, CID2)
        self.assertEqual(session.state, "ready")
        released = record_releases(p)
        self.assertEqual(p.connect(STOP, method=b"POST").status(), 204)
        self.assertEqual(sorted(hls for _, hls in released), [False, True])
        self.assertTrue(player.finished_cleanly())
        self.assertTrue(session.closed)
        self.assertEqual(session.close_reason, "stopped")
        self.assertEqual(len(p.engine.stops), 2)  # the TS and the HLS engine session
        self.assertEqual(list(p.hls), [kept])
        # an HLS-only content is found as well
        self.assertEqual(p.connect(b"/ace/stop?id=" + CID2.encode(), method=b"POST").status(), 204)
        self.assertEqual(len(p.hls), 0)

    def test_unknown_is_404_bad_is_400_get_is_405(self) -> None:
        p = InMemoryProxy()
        c = p.connect(STOP, method=b"POST")
        self.assertEqual(c.status(), 404)
        self.assertIn(b"Stream not found", c.value())
        self.assertIn(b"text/plain", c.value().lower())
        for bad in (b"/ace/stop", b"/ace/stop?id=nothex", b"/ace/stop?id=" + CID.encode() + b"&infohash=" + CID2.encode()):
            self.assertEqual(p.connect(bad, method=b"POST").status(), 400, bad)
        p.connect()
        self.assertEqual(p.connect(STOP).status(), 405)  # GET never stops anything
        self.assertEqual(len(p.registry), 1)
        self.assertEqual(p.engine.stops, [])

    def test_the_token_guard_covers_it(self) -> None:
        token = "s3cret-t0ken"
        p = InMemoryProxy(token=token)
        p.connect(b"/ace/getstream?id=" + CID.encode() + b"&token=" + token.encode())
        for refused in (STOP, STOP + b"&token=wrong"):
            c = p.connect(refused, method=b"POST")
            self.assertEqual(c.status(), 401)
        self.assertEqual(len(p.registry), 1)
        self.assertEqual(p.connect(STOP + b"&token=" + token.encode(), method=b"POST").status(), 204)
        self.assertEqual(len(p.registry), 0)


class StatusListingTests(SynchronousTestCase):
    def test_ts_and_hls_sessions_carry_their_kind_play_path_and_live_fields(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        p.connect(b"/ace/getstream?id=" + CID.encode() + b"&transcode_audio=1")
        hls_session(p, CID2)
        p.engine.response.data(ts(2))
        p.clock.advance(1)
        doc = json.loads(p.connect(b"/ace/status").body())
        [ts_doc] = doc["sessions"]
        [hls_doc] = doc["hls"]
        self.assertEqual((ts_doc["kind"], ts_doc["play"]), ("ts", f"ace/getstream?id={CID}&transcode_audio=1"))
        self.assertEqual((hls_doc["kind"], hls_doc["play"]), ("hls", f"ace/manifest.m3u8?id={CID2}"))
        for d in (ts_doc, hls_doc):
            for field in ("peers", "speed_down", "speed_up", "downloaded", "status", "bitrate_in", "bitrate_out", "history"):
                self.assertIn(field, d)
            self.assertEqual(d["peers"], 4)  # both polled the engine's stat_url
        self.assertEqual(hls_doc["state"], "ready")
        self.assertEqual(hls_doc["engine"], "http://engine:6878")

    def test_status_of_an_hls_only_content(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        hls_session(p)
        c = p.connect(b"/ace/status?id=acestream://" + CID.encode())
        self.assertEqual(c.status(), 200)
        doc = json.loads(c.body())
        self.assertEqual((doc["kind"], doc["stream_id"], doc["peers"]), ("hls", "acestream://" + CID, 4))
        self.assertTrue(doc["stat_url"].startswith("http://engine:6878/ace/stat/"))

    def test_the_token_is_never_in_the_status(self) -> None:
        token = "s3cret-t0ken"
        p = InMemoryProxy(token=token)
        p.connect(b"/ace/getstream?id=" + CID.encode() + b"&token=" + token.encode())
        hls_session(p, CID2)
        body = p.connect(b"/ace/status?token=" + token.encode()).body()
        self.assertIn(b"ace/getstream?id=", body)
        self.assertNotIn(token.encode(), body)
