"""
What a packager checks, with the real tools where they are installed (CI
installs them: ``./dev`` need_tools): every shell script is shellcheck-clean,
the systemd unit passes ``systemd-analyze verify``, and the project builds
(sdist, then a wheel from that sdist, as ``python -m build`` does) into a
wheel with full metadata and the twistd plugin, which runs
``twistd acexy --help`` from a fresh virtualenv.

Offline by design: the build uses this environment's setuptools (the
``[test]`` extras ask for one that writes PEP 639 license metadata) instead
of downloading a build environment, and the fresh virtualenv gets only the
wheel; its dependencies (Twisted, treq, ...) come from this environment's
site-packages through a ``.pth`` path entry, which puts no ``.pth`` of this
environment into effect, so this source tree (installed here in editable
mode) stays out: the test checks that acexy_tw and the plugin are imported
from the fresh virtualenv. (Installing the wheel with its dependencies from
the package index, ``python -m venv v && v/bin/pip install acexy_tw-*.whl &&
v/bin/twistd acexy --help``, was checked by hand; it needs the network.)

The Dockerfile and compose checks are text checks in tests/unit/test_etc.py.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120

#: directories of the work tree that are not the project's files
NOT_SOURCE = {".git", ".venv", "build", "dist", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis"}


def _shell_scripts() -> list[Path]:
    """Every shell script of the repository: by shebang, or named *.sh."""
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [
            d for d in dirnames
            if d not in NOT_SOURCE and not d.endswith(".egg-info") and not d.startswith(("_trial_temp", "tests."))
        ]  # fmt: skip
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".sh"):
                found.append(path)
                continue
            try:
                with path.open("rb") as f:
                    first = f.readline(200)
            except OSError:
                continue
            if re.match(rb"#!\s*(/usr/bin/env\s+)?(/bin/|/usr/bin/)?(ba|a|da)?sh\b", first):
                found.append(path)
    return sorted(found)


def test_the_shell_scripts_are_found():
    names = {str(p.relative_to(ROOT)) for p in _shell_scripts()}
    assert {"dev", ".ci/run", "etc/openwrt/acexy.init"} <= names, names


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_is_clean(script):
    # Every severity, style included; directives in the scripts say why a check is off.
    out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify checks that ExecStart's binary exists: point it at this venv's twistd.
    text = (ROOT / "etc" / "systemd" / "acexy.service").read_text(encoding="utf-8")
    twistd = str(Path(sys.executable).with_name("twistd"))
    text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={twistd}", text, flags=re.M)
    assert count == 1
    unit = tmp_path / "acexy.service"
    unit.write_text(text, encoding="utf-8")
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0 and "acexy.service" not in out.stderr, out.stderr


# -- the wheel ------------------------------------------------------------------------


def _backend(hook: str, out_dir: Path, cwd: Path) -> Path:
    """Runs one PEP 517 hook of setuptools' backend (no build isolation) with
    every warning an error: a setuptools deprecation block fails the build."""
    code = f"from setuptools import build_meta as b; print(b.{hook}({str(out_dir)!r}))"
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "!!" not in out.stderr and "Warning" not in out.stderr, out.stderr
    return out_dir / out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist, wheel): the sdist built from a copy of this work tree, the wheel
    built from the unpacked sdist (so the sdist has to be complete)."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, f"setuptools {setuptools.__version__}: the [test] extras need >= 77 (./dev test installs it)"
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(*NOT_SOURCE, "*.egg-info", "_trial_temp*", "tests.*", "results"),
    )
    # A developer's tree has Twisted's plugin cache beside the plugin: it must stay out.
    (src / "twisted" / "plugins" / "dropin.cache").write_bytes(b"not ours")
    dist = tmp / "dist"
    dist.mkdir()
    sdist = _backend("build_sdist", dist, src)
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.10.12+, 3.11.4+
            tar.extractall(tmp / "unpacked", filter="data")
        else:
            tar.extractall(tmp / "unpacked")
    [unpacked] = (tmp / "unpacked").iterdir()
    wheel = _backend("build_wheel", dist, unpacked)
    return sdist, wheel


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        [name] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(z.read(name).decode("utf-8"))


def test_wheel_metadata_is_complete(built):
    _, wheel = built
    meta = _metadata(wheel)
    assert meta["Name"] == "acexy-tw"
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["Summary"] and meta["Author"]
    classifiers = meta.get_all("Classifier")
    assert "Framework :: Twisted" in classifiers
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert any(c.startswith("Topic :: ") for c in classifiers)
    versions = [c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions and all(int(v.split(".")[1]) >= 10 for v in versions), versions
    # PEP 639: the SPDX expression replaces "License ::" classifiers.
    assert not any(c.startswith("License :: ") for c in classifiers)
    assert meta["Description-Content-Type"] == "text/x-rst"
    assert meta.get_payload().startswith("========\nacexy-tw\n========")
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("twisted[tls]") for r in requires)
    # the test tools are an extra, never a runtime dependency
    assert all("extra ==" in r for r in requires if r.startswith(("pytest", "hypothesis", "pyyaml", "setuptools")))


def test_wheel_holds_the_package_the_plugin_and_the_license_only(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "acexy_tw/__init__.py" in names and "acexy_tw/web/dashboard.html" in names
    # twisted/plugins gets our module only: no __init__.py (Twisted owns the
    # package), no dropin.cache.
    assert [n for n in names if n.startswith("twisted/")] == ["twisted/plugins/acexy_plugin.py"]
    assert any(re.fullmatch(r"acexy_tw-[^/]+\.dist-info/licenses/LICENSE", n) for n in names)
    assert not [n for n in names if n.startswith(("tests/", "bench/", "etc/")) or "__pycache__" in n]


def test_sdist_carries_license_readme_and_deployment_files(built):
    sdist, _ = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {
        "LICENSE", "README.rst", "setup.py", "pyproject.toml", "twisted/plugins/acexy_plugin.py",
        "acexy_tw/web/dashboard.html", "etc/systemd/acexy.service", "etc/openwrt/acexy.init",
        "etc/docker/Dockerfile", "etc/acexy.env.example",
    }  # fmt: skip
    assert expected <= names, expected - names
    assert "twisted/plugins/dropin.cache" not in names


def test_twistd_acexy_runs_from_a_fresh_venv_with_only_the_wheel(built, tmp_path):
    _, wheel = built
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=TIMEOUT)
    python = venv / "bin" / "python"
    # This environment's pip installs into the new one (it has none of its own).
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True, timeout=TIMEOUT
    ).strip())  # fmt: skip
    ours = sysconfig.get_paths()
    (site / "zz_dependencies.pth").write_text(
        "".join(f"{p}\n" for p in dict.fromkeys([ours["purelib"], ours["platlib"]])), encoding="utf-8"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ACEXY_"))}

    where = subprocess.run(
        [str(python), "-c",
         "import sys, acexy_tw\n"
         "from twisted.plugin import getPlugins\n"
         "from twisted.application.service import IServiceMaker\n"
         "[maker] = [m for m in getPlugins(IServiceMaker) if m.tapname == 'acexy']\n"
         "import twisted.plugins.acexy_plugin as plugin\n"
         "print(acexy_tw.__file__); print(plugin.__file__); print(repr(sys.path))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    package, plugin, path = where.stdout.splitlines()
    assert Path(package).is_relative_to(site), package
    assert Path(plugin).is_relative_to(site), plugin
    assert str(ROOT) not in eval(path), path  # the source tree is not importable there

    # twistd itself (python -m twisted is twistd; the wheel brings no script of Twisted's)
    out = subprocess.run(
        [str(python), "-m", "twisted", "acexy", "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    usage = out.stdout.splitlines()[0]
    assert usage.startswith("Usage: ") and usage.endswith(" acexy [options]"), out.stdout[:500]
    assert "--engine-host=" in out.stdout and "--demo" in out.stdout
