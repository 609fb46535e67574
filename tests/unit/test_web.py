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
