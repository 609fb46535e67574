"""A strports ``ssl:`` listener (pyOpenSSL) serving players over HTTPS, with a
certificate the test generates and a client that verifies it."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseNeverReceived
from treq.client import HTTPClient

from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration.harness import CID, Player, reactor, sim_engine, start_proxy, within
from acexy_tw.build import make_pool


def self_signed(directory: str) -> tuple[str, bytes]:
    """A key + certificate for localhost / 127.0.0.1, as one PEM file (strports' privateKey=)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    path = os.path.join(directory, "proxy.pem")
    with open(path, "wb") as f:
        f.write(key_pem + cert_pem)
    return path, cert_pem


class TLSTests(TestCase):
    async def _tls_proxy(self, trust_our_certificate: bool):
        """A proxy on an ``ssl:`` listener with a fresh certificate, and a client
        that trusts that certificate (or only the system's roots)."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        pem, cert_pem = self_signed(directory)
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine, listen=f"ssl:0:privateKey={pem}:interface=127.0.0.1")
        pool = make_pool(reactor)
        pool.persistent = False
        self.addCleanup(pool.closeCachedConnections)
        if trust_our_certificate:
            policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(cert_pem))
            agent = Agent(reactor, contextFactory=policy, pool=pool)
        else:
            agent = Agent(reactor, pool=pool)  # system trust: our self-signed cert is not in it
        return engine, proxy, HTTPClient(agent)

    async def test_players_can_stream_over_https(self) -> None:
        engine, proxy, client = await self._tls_proxy(trust_our_certificate=True)
        response = await within(client.get(f"https://localhost:{proxy.port}/ace/getstream?id={CID}", unbuffered=True))
        self.assertEqual(response.code, 200)
        player = Player()
        player.response = response
        response.deliverBody(player)
        self.addCleanup(player.hang_up)
        data = await player.when_received(50 * PACKET_SIZE)
        self.assertEqual(data[0], 0x47)
        self.assertEqual(data[PACKET_SIZE], 0x47)

    async def test_a_client_that_does_not_trust_the_certificate_is_refused(self) -> None:
        engine, proxy, client = await self._tls_proxy(trust_our_certificate=False)
        with self.assertRaises(ResponseNeverReceived):  # the TLS handshake fails
            await within(client.get(f"https://localhost:{proxy.port}/ace/status"))
        self.assertEqual(engine.getstream_calls, [])
