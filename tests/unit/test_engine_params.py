"""
Property: for any query string a player sends, the engine's getstream gets
exactly the player's allowlisted options, decoded once, the normalised
selector, and the proxy's own ``format`` and ``pid``; never a parameter the
player did not send as such (issue #12, points 3 and 4).

The player's query goes through what the proxy really runs: twisted.web's
query parsing (as ``Request.args`` is built), :func:`parse_query`, and
:meth:`EngineClient.start` against an in-memory engine (StubTreq), which
records the raw request URI; that URI is decoded once, strictly, here.
"""

from __future__ import annotations

from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import parse_qs

from acexy_tw.content import ENGINE_OPTIONS, FOREIGN_SELECTORS, RESERVED_PARAMS, SELECTORS, BadRequest, parse_query
from acexy_tw.engine import EngineAddress, EngineClient
from acexy_tw.testing import ScriptedResource

from tests.unit.test_engine import start_answer

HEX = "0123456789abcdefABCDEF"


def case_variants(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.upper() if f else c for c, f in zip(name, flips))
    )


#: every kind of name a player may send: options, the proxy's own names and the
#: selectors in any case, the engine's other selectors, and anything at all
names = st.one_of(
    st.sampled_from(sorted(ENGINE_OPTIONS)),
    st.sampled_from(sorted(ENGINE_OPTIONS)),  # twice: most examples forward something
    st.sampled_from(sorted(ENGINE_OPTIONS)).flatmap(case_variants),
    st.sampled_from(sorted(RESERVED_PARAMS)).flatmap(case_variants),
    st.sampled_from(sorted(FOREIGN_SELECTORS)).flatmap(case_variants),
    st.text(min_size=0, max_size=12),
    st.sampled_from(["accinj", "junk", "a b", "x&y", "p=q", "%26", "+", "#frag", "content_id\x00"]),
)

#: values with the characters that matter in a query string, and any text
values = st.one_of(
    st.text(max_size=20),
    st.text(alphabet="&=%+#;? /\\\r\n\x00\x1bé中", max_size=12),
    st.sampled_from(["", "1", "0", "eng", "1&accinj=1", "%26accinj%3D1", "a+b", "0,1"]),
)

#: how a player's client percent-encodes a name or value
encoders = st.sampled_from(
    [
        lambda s: quote(s, safe=""),  # everything
        quote_plus,  # form style: space as '+'
        lambda s: quote(s, safe="!$'()*,/:;?@~"),  # only what must be
    ]
)


@st.composite
def queries(draw: Any) -> tuple[str, str]:
    """A query string with one selector (repeated, any case of name and value)
    among arbitrary pairs; returns (query, the selector's value lower-cased)."""
    value = draw(st.text(alphabet=HEX, min_size=40, max_size=40))
    selector = draw(st.sampled_from(sorted(SELECTORS)))
    pairs = [(draw(case_variants(selector)), value)]
    for _ in range(draw(st.integers(0, 3))):  # the same selector again: same value, any case
        pairs.append((draw(case_variants(selector)), draw(case_variants(value.lower()))))
    pairs += draw(st.lists(st.tuples(names, values), max_size=12))
    order = draw(st.permutations(range(len(pairs))))
    encode = draw(encoders)
    query = "&".join(f"{encode(n)}={encode(v)}" for n, v in (pairs[i] for i in order))
    return query, value.lower()


def client_pairs(query: str) -> list[tuple[str, str]]:
    """What the player sent, decoded once, as twisted.web decodes it."""
    args = parse_qs(query.encode("ascii"), 1)
    return [(k.decode("utf-8"), v.decode("utf-8")) for k, vs in args.items() for v in vs]


class EngineParamsProperty(SynchronousTestCase):
    def setUp(self) -> None:
        self.uris: list[bytes] = []
        answer = start_answer()

        def engine(request: Any) -> bytes:
            self.uris.append(request.uri)
            return answer(request)

        self.stub = StubTreq(ScriptedResource(engine))
        self.client = EngineClient(self.stub, EngineAddress("http", "engine", 6878), Clock(), timeout=10)

    def engine_receives(self, query: str) -> list[tuple[str, str]]:
        """The parameters the engine got for a player's ``query`` (raw URI, decoded once)."""
        key = parse_query(parse_qs(query.encode("ascii"), 1))
        self.uris.clear()
        d = self.client.start(key)
        self.stub.flush()
        self.successResultOf(d)
        [uri] = self.uris
        raw = urlsplit(uri.decode("ascii")).query
        return parse_qsl(raw, keep_blank_values=True, strict_parsing=True, errors="strict")

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(queries())
    def test_the_engine_gets_exactly_the_allowlisted_parameters(self, generated: tuple[str, str]) -> None:
        query, selector_value = generated
        sent = client_pairs(query)
        options = {}
        conflict = False
        for name, value in sent:
            if name in ENGINE_OPTIONS and value:
                conflict |= options.setdefault(name, value) != value
        foreign = any(n.lower() in FOREIGN_SELECTORS and v for n, v in sent)
        # a player's own selector-looking junk ("ID" with another value) can make it a 400
        other_selector = any(
            n.lower() in SELECTORS and v and v.lower() != selector_value for n, v in sent
        ) or len({n.lower() for n, v in sent if n.lower() in SELECTORS and v}) > 1
        try:
            received = self.engine_receives(query)
        except BadRequest:
            event("400")
            self.assertTrue(conflict or foreign or other_selector, query)
            return
        event("forwarded options" if received[2:-1] else "accepted, no options")
        self.assertFalse(conflict or foreign or other_selector, query)

        names = [n for n, _ in received]
        # the proxy's own, once each, first and last
        self.assertEqual(received[0], ("format", "json"))
        self.assertEqual(names[-1], "pid")
        self.assertEqual(Counter(n.lower() for n in names)["format"], 1)
        self.assertEqual(Counter(n.lower() for n in names)["pid"], 1)
        self.assertRegex(received[-1][1], r"^[0-9a-f]{32}$")
        # the selector, normalised, once
        key_type = next(SELECTORS[n.lower()] for n, v in sent if n.lower() in SELECTORS and v)
        self.assertEqual(received[1], (key_type, selector_value))
        # the rest: exactly the player's allowlisted options, as sent (decoded once)
        self.assertEqual(sorted(received[2:-1]), sorted(options.items()), query)
        for pair in received[2:-1]:
            self.assertIn(pair, sent)  # never a parameter the player did not send as such
            self.assertIn(pair[0], ENGINE_OPTIONS)

    def test_issue_cases(self) -> None:
        cid = "ab" * 20
        cases = {
            f"id={cid}&PID=1&Pid=2&FORMAT=hls&Format=x": [],
            f"id={cid}&transcode_audio=1%26accinj%3D1": [("transcode_audio", "1&accinj=1")],
            f"id={cid}&junk=1&accinj=1&transcode_mp3=1": [("transcode_mp3", "1")],
            f"id={cid}&preferred_audio_language=%2526": [("preferred_audio_language", "%26")],
        }
        for query, options in cases.items():
            received = self.engine_receives(query)
            self.assertEqual([n for n, _ in received], ["format", "content_id", *[n for n, _ in options], "pid"])
            self.assertEqual(received[2:-1], options)
            self.assertEqual(received[:2], [("format", "json"), ("content_id", cid)])
        for query in (f"id={cid}%26accinj%3D1", f"id={cid}&url=http://x/a.torrent", f"id={cid}&magnet=m"):
            with self.assertRaises(BadRequest):
                parse_query(parse_qs(query.encode(), 1))
