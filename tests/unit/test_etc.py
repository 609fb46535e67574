"""
The deployment files in ``etc/`` stay true: the env example is what its
generator prints from ``SETTINGS``, the systemd unit verifies and is hardened,
the OpenWrt init script parses and reads the env file right, the Docker files
have what they promise (a pinned base, dependencies before the source, pinned
compose images gated on health), and the HAProxy config is valid and hashes on
the content id. (``tests/e2e/test_haproxy.py`` runs that config for real;
``tests/e2e/test_packaging.py`` runs shellcheck, systemd-analyze and a wheel build.)
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from acexy_tw.config import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
ETC = ROOT / "etc"
RUN = "twistd -n --pidfile= --logger acexy_tw.logs.observer acexy"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_env_example", ETC / "gen_env_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- etc/acexy.env.example --------------------------------------------------------


def test_env_example_is_exactly_what_the_generator_prints():
    expected = _load_generator().render()
    actual = (ETC / "acexy.env.example").read_text(encoding="utf-8")
    assert actual == expected, "etc/acexy.env.example is stale: run .venv/bin/python etc/gen_env_example.py"


def test_env_example_documents_every_setting_with_default_option_and_aliases():
    text = (ETC / "acexy.env.example").read_text(encoding="utf-8")
    for s in SETTINGS:
        for name in s.env_names:
            assert name in text, name
        assert f"--{s.option}." in text, s.option
        if s.secret:
            assert re.search(rf"^#{s.env}=$", text, re.M), f"{s.env}: a secret must be an empty placeholder"
        else:
            assert re.search(rf"^#{re.escape(s.env)}={re.escape(s.default)}$", text, re.M), s.env
    # The two operations settings the deployment files rely on.
    assert re.search(r"^#ACEXY_TOKEN=$", text, re.M)
    assert re.search(r"^#ACEXY_LOG_FORMAT=", text, re.M)


def test_env_example_as_shipped_sets_nothing():
    """Copying the example to /etc/acexy/acexy.env changes no setting."""
    text = (ETC / "acexy.env.example").read_text(encoding="utf-8")
    live = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert live == []


def test_env_example_uncommented_is_a_valid_configuration():
    """Every default shown, uncommented, is accepted by load_config."""
    from acexy_tw.config import load_config

    env = {}
    for line in (ETC / "acexy.env.example").read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"#(ACEXY_[A-Z0-9_]+)=(.*)", line)
        if m:
            env[m.group(1)] = m.group(2)
    assert set(env) == {s.env for s in SETTINGS}
    load_config(env)


def test_generator_check_mode_agrees():
    out = subprocess.run(
        [sys.executable, str(ETC / "gen_env_example.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


# -- etc/systemd/acexy.service ------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(ETC / "systemd" / "acexy.service", encoding="utf-8")
    return parser


def test_systemd_unit_runs_twistd_in_the_foreground_with_restart_and_clean_stop():
    unit = _unit()
    service = unit["Service"]
    exec_start = service["ExecStart"]
    binary, *args = shlex.split(exec_start)
    assert os.path.isabs(binary) and binary.endswith("/twistd")
    assert "twistd " + " ".join(args) == RUN
    assert service["EnvironmentFile"] == "-/etc/acexy/acexy.env"
    assert service["Restart"] == "on-failure"
    assert service["RestartSec"] == "2"
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"] == "10"
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "", "root")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_is_hardened():
    service = _unit()["Service"]
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }
    assert {k: service.get(k) for k in expected} == expected


# ``systemd-analyze verify`` runs in tests/e2e/test_packaging.py (with the other tools).


# -- etc/openwrt/acexy.init ----------------------------------------------------------


INIT = ETC / "openwrt" / "acexy.init"


def test_openwrt_init_script_parses():
    out = subprocess.run(["sh", "-n", str(INIT)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_openwrt_init_script_is_a_procd_service():
    text = INIT.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    assert re.search(r"^USE_PROCD=1$", text, re.M)
    assert re.search(r"^START=95$", text, re.M)
    assert "start_service()" in text and "procd_open_instance" in text and "procd_close_instance" in text
    assert 'procd_set_param command "$PROG" -n --pidfile= --logger acexy_tw.logs.observer acexy' in text
    assert re.search(r"^PROG=/usr/bin/twistd$", text, re.M)
    assert re.search(r"^ENV_FILE=/etc/acexy/acexy.env$", text, re.M)
    for param in ("respawn", "stdout 1", "stderr 1", "env"):
        assert f"procd_set_param {param}" in text, param


PROCD_STUBS = """
procd_open_instance() { echo "open $*"; }
procd_close_instance() { echo "close"; }
procd_set_param() { printf '%s' "$1"; shift; for a in "$@"; do printf ' [%s]' "$a"; done; echo; }
"""


def _start_service(env_file: Path) -> dict[str, list[str]]:
    """Run start_service() with procd stubbed; the params it set, by name."""
    script = f'{PROCD_STUBS}\n. "{INIT}"\nENV_FILE="{env_file}"\nstart_service\n'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    params = {}
    lines = out.stdout.splitlines()
    assert lines[0].startswith("open") and lines[-1] == "close", out.stdout
    for line in lines[1:-1]:
        name, _, rest = line.partition(" ")
        params[name] = re.findall(r"\[(.*?)\](?= \[|$)", rest)
    return params


def test_openwrt_init_script_passes_the_env_file_to_procd(tmp_path):
    env_file = tmp_path / "acexy.env"
    env_file.write_text(
        "# a comment\n"
        "\n"
        "ACEXY_HOST=192.168.1.10\n"
        'export ACEXY_PORT="6879"\n'
        "ACEXY_LISTEN_ADDR='tcp:8080:interface=0.0.0.0'\n"
        "ACEXY_LINGER=\n"
        "not a variable\n"
        "1BAD=x\n"
        "ACEXY_ORCH_APIKEY=k=v w\n"
        "ACEXY_LOG_LEVEL=debug\r\n"
        "ACEXY_LAST=no-newline",
        encoding="utf-8",
    )
    params = _start_service(env_file)
    assert params["command"] == ["/usr/bin/twistd", "-n", "--pidfile=", "--logger", "acexy_tw.logs.observer", "acexy"]
    assert params["env"] == [
        "PYTHONUNBUFFERED=1",
        "ACEXY_HOST=192.168.1.10",
        "ACEXY_PORT=6879",
        "ACEXY_LISTEN_ADDR=tcp:8080:interface=0.0.0.0",
        "ACEXY_ORCH_APIKEY=k=v w",
        "ACEXY_LOG_LEVEL=debug",
        "ACEXY_LAST=no-newline",
    ]
    assert params["respawn"] and params["stdout"] == ["1"] and params["stderr"] == ["1"]
    assert params["file"] == [str(env_file)]


def test_openwrt_init_script_without_env_file_uses_defaults(tmp_path):
    params = _start_service(tmp_path / "missing.env")
    assert params["env"] == ["PYTHONUNBUFFERED=1"]


def test_openwrt_init_script_accepts_the_shipped_example():
    params = _start_service(ETC / "acexy.env.example")
    assert params["env"] == ["PYTHONUNBUFFERED=1"]  # every line is commented out


# -- etc/docker -----------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ETC / "docker" / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    result = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def test_dockerfile_has_the_key_instructions():
    instructions = _dockerfile()
    by_name: dict[str, list[str]] = {}
    for word, rest in instructions:
        by_name.setdefault(word, []).append(rest)
    [base] = by_name["FROM"]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", base), base
    assert any(r.startswith("pip install --no-deps .") for r in by_name["RUN"])
    [user] = by_name["USER"]
    assert user.split(":")[0] not in ("root", "0")
    assert by_name["EXPOSE"] == ["8080"]
    assert by_name["STOPSIGNAL"] == ["SIGTERM"]
    [cmd] = by_name["CMD"]
    assert json.loads(cmd) == ["twistd", "-n", "--pidfile=", "--logger", "acexy_tw.logs.observer", "acexy"]
    # USER comes before CMD (the process is not root).
    names = [w for w, _ in instructions]
    assert names.index("USER") < names.index("CMD")


def test_dockerfile_healthcheck_uses_python_urllib_on_healthz():
    [health] = [rest for word, rest in _dockerfile() if word == "HEALTHCHECK"]
    exec_form = json.loads(health[health.index("CMD") + len("CMD") :].strip())
    assert exec_form[:2] == ["python", "-c"]
    code = exec_form[2]
    assert "urllib.request" in code and "http://127.0.0.1:8080/healthz" in code
    compile(code, "<healthcheck>", "exec")


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    ignore = (ETC / "docker" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    kept = {line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")}
    for word, rest in _dockerfile():
        if word != "COPY":
            continue
        *sources, _dest = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in kept, f"{source} is excluded by Dockerfile.dockerignore"


def test_dockerfile_base_image_python_is_one_the_package_declares():
    [base] = [rest for word, rest in _dockerfile() if word == "FROM"]
    major, minor = re.match(r"python:(\d+)\.(\d+)\.", base).groups()
    setup_py = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert f'"Programming Language :: Python :: {major}.{minor}"' in setup_py


SOURCE = ("acexy_tw", "twisted/plugins/acexy_plugin.py", "README.rst")


def test_dockerfile_installs_dependencies_in_a_layer_before_the_source():
    """Code changes must not reinstall every dependency: the only files copied
    before the dependency install are the packaging ones, the source comes
    after it, and the package itself is then installed without dependencies."""
    instructions = _dockerfile()
    [deps] = [i for i, (w, rest) in enumerate(instructions) if w == "RUN" and "pip install -r" in rest]
    copies = [(i, rest.split()[:-1]) for i, (w, rest) in enumerate(instructions) if w == "COPY"]
    before = [src for i, sources in copies if i < deps for src in sources]
    after = [src for i, sources in copies if i > deps for src in sources]
    assert before == ["setup.py"], before
    assert set(SOURCE) <= set(after), after
    [install] = [i for i, (w, rest) in enumerate(instructions) if w == "RUN" and "pip install --no-deps ." in rest]
    assert install > max(i for i, sources in copies if set(sources) & set(SOURCE))


def _setup_kwargs() -> dict:
    """What setup.py passes to setup(), read with setuptools' setup stubbed."""
    from unittest import mock

    import setuptools

    with mock.patch.object(setuptools, "setup") as setup:
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            runpy.run_path(str(ROOT / "setup.py"))
        finally:
            os.chdir(cwd)
    [call] = setup.call_args_list
    return call.kwargs


def test_dockerfile_dependency_list_is_setup_py_install_requires(tmp_path):
    """The Dockerfile's dependency step, run as it is (no setuptools, an empty
    README.rst), prints exactly setup.py's install_requires."""
    [deps] = [rest for word, rest in _dockerfile() if word == "RUN" and "pip install -r" in rest]
    code = re.search(r'python -c "([^"]+)" > /tmp/requirements\.txt', deps).group(1)
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    assert "touch README.rst" in deps
    (tmp_path / "README.rst").touch()
    # -S: no site-packages, as in the image where setuptools is not installed
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == _setup_kwargs()["install_requires"]


def test_dockerignore_lets_the_license_in():
    ignore = (ETC / "docker" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    assert "!LICENSE" in ignore.splitlines()
    assert any(word == "COPY" and "LICENSE" in rest.split() for word, rest in _dockerfile())


COMPOSE = ETC / "docker" / "compose.yaml"


def _compose_lines() -> list[str]:
    return [line.split(" #")[0].rstrip() for line in COMPOSE.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _compose_services() -> dict[str, list[str]]:
    """Each service's lines (text only), by name."""
    services: dict[str, list[str]] = {}
    current = None
    for line in _compose_lines():
        m = re.fullmatch(r"  ([a-z0-9_-]+):", line)
        if m:
            current = m.group(1)
            services[current] = []
        elif current and line.startswith("    "):
            services[current].append(line)
        elif not line.startswith(" "):
            current = None
    return services


def test_compose_images_are_pinned_tags():
    """Text only (no YAML library): every image names a tag, never latest; a
    pulled one is a version, the one built here (build:) is local."""
    services = _compose_services()
    assert set(services) == {"acexy", "orchestrator", "gluetun"}
    for name, lines in services.items():
        [image] = [line.split("image:", 1)[1].strip() for line in lines if line.strip().startswith("image:")]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
        if any(line.strip() == "build:" for line in lines):
            assert tag == "local", f"{name}: {image}"
        else:
            assert re.fullmatch(r"v?\d+(\.\d+)+", tag), f"{name}: {image} is not a release tag"


def test_compose_depends_on_waits_for_health():
    """Text only: every depends_on entry is a mapping with
    condition: service_healthy (no bare list), and each dependency has a
    health check (in the file, or Gluetun's image HEALTHCHECK)."""
    services = _compose_services()
    conditions: dict[str, str] = {}
    for name, lines in services.items():
        for i, line in enumerate(lines):
            if line.strip() != "depends_on:":
                continue
            indent = len(line) - len(line.lstrip())
            dependency = None
            for entry in lines[i + 1 :]:
                if len(entry) - len(entry.lstrip()) <= indent:
                    break
                assert not entry.strip().startswith("- "), f"{name}: depends_on as a bare list"
                m = re.fullmatch(r"\s+([a-z0-9_-]+):", entry)
                if m:
                    dependency = m.group(1)
                    continue
                key, _, value = entry.strip().partition(":")
                assert key == "condition" and dependency, entry
                conditions[f"{name}->{dependency}"] = value.strip()
    assert conditions == {
        "acexy->orchestrator": "service_healthy",
        "orchestrator->gluetun": "service_healthy",
    }
    assert any(line.strip() == "healthcheck:" for line in services["orchestrator"])
    # Gluetun's image defines HEALTHCHECK itself; nothing here may turn it off.
    assert not any("healthcheck" in line for line in services["gluetun"])


def test_compose_file_parses_and_wires_the_three_services():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ETC / "docker" / "compose.yaml").read_text(encoding="utf-8"))
    services = doc["services"]
    assert set(services) >= {"acexy", "orchestrator", "gluetun"}

    acexy = services["acexy"]
    build = acexy["build"]
    context = (ETC / "docker" / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == ETC / "docker" / "Dockerfile"
    env = acexy["environment"]
    assert env["ACEXY_ORCH_URL"] == "http://orchestrator:8000"
    assert env["ACEXY_ORCH_APIKEY"].startswith("${")  # from the environment, not written here
    assert env["ACEXY_HOST"] == "gluetun"
    assert "8080:8080" in acexy["ports"]

    orchestrator = services["orchestrator"]
    assert orchestrator["image"].startswith("ghcr.io/krinkuto11/acestream-orchestrator:v")
    assert acexy["depends_on"] == {"orchestrator": {"condition": "service_healthy"}}
    assert orchestrator["depends_on"] == {"gluetun": {"condition": "service_healthy"}}
    health = orchestrator["healthcheck"]["test"]
    assert health[:3] == ["CMD", "python", "-c"] and "/orchestrator/status" in health[3]
    compile(health[3], "<healthcheck>", "exec")
    assert any("docker.sock" in v for v in orchestrator["volumes"])
    assert orchestrator["environment"]["GLUETUN_CONTAINER_NAME"] == services["gluetun"]["container_name"]

    gluetun = services["gluetun"]
    assert gluetun["image"].startswith("qmcgaw/gluetun")
    assert "NET_ADMIN" in gluetun["cap_add"]


# -- etc/haproxy/haproxy.cfg ----------------------------------------------------------


HAPROXY_CFG = ETC / "haproxy" / "haproxy.cfg"


def _haproxy_directives() -> list[str]:
    return [
        line.strip()
        for line in HAPROXY_CFG.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_haproxy_config_hashes_consistently_on_the_content_key():
    lines = _haproxy_directives()
    assert "balance hash var(txn.content_key)" in lines
    assert "hash-type consistent" in lines
    assert not any(line.startswith("balance uri") for line in lines)
    assert not any(line.startswith("hash-balance-factor") for line in lines)
    for param in ("id", "content_id", "infohash"):
        assert any(
            line.startswith("http-request set-var(txn.content_key)") and f"url_param({param}),lower" in line
            for line in lines
        ), param


def test_haproxy_config_streams_for_long_and_checks_healthz():
    lines = _haproxy_directives()
    for directive in ("timeout server 1h", "timeout tunnel 1h", "timeout client 1h"):
        assert directive in lines
    assert "option httpchk GET /healthz" in lines
    assert "monitor-uri /healthz" in lines
    servers = [line for line in lines if line.startswith("server ")]
    # the players' backend and the dashboard's: the same two instances
    assert [s.split()[2] for s in servers] == ["127.0.0.1:8081", "127.0.0.1:8082"] * 2


def test_haproxy_config_hashes_hls_segments_on_the_content_id_in_their_path():
    lines = _haproxy_directives()
    assert "http-request set-var(txn.content_key) path,field(4,/),lower if { path_beg /ace/hls/ }" in lines


def test_haproxy_config_keeps_a_browser_on_one_dashboard():
    lines = _haproxy_directives()
    assert "use_backend dashboard if dashboard !content_request" in lines
    assert any(line.startswith("cookie ACEXY_INSTANCE insert") for line in lines)


@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed")
def test_haproxy_accepts_the_config():
    out = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr
