from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

setup(
    name="acexy-tw",
    use_incremental=True,
    description="AceStream proxy on Twisted: one engine session per content, many players, flow control",
    long_description=(HERE / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    author="the acexy-tw authors",
    # PEP 639 (setuptools >= 77, see pyproject.toml): an SPDX expression plus
    # the file; a "License ::" classifier beside it is refused by setuptools.
    license_expression="MIT",
    license_files=["LICENSE"],
    keywords=["acestream", "proxy", "mpeg-ts", "hls", "twisted", "iptv"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Environment :: No Input/Output (Daemon)",
        "Framework :: Twisted",
        "Intended Audience :: End Users/Desktop",
        "Intended Audience :: System Administrators",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Programming Language :: Python :: Implementation :: CPython",
        "Topic :: Internet :: Proxy Servers",
        "Topic :: Internet :: WWW/HTTP :: HTTP Servers",
        "Topic :: Multimedia :: Video",
    ],
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["twisted.plugins"],
    # Said outright (it is the default): with it, setuptools sees the simple
    # flat layout and makes an editable install (./dev) a plain .pth entry for
    # this directory, so twistd finds twisted/plugins/acexy_plugin.py by
    # scanning sys.path, with no deprecated "compat" mode.
    package_dir={"": "."},
    # twisted/plugins has no __init__.py (it must not: Twisted's own package
    # owns it); only our plugin module goes in, never a dropin.cache.
    package_data={"twisted": ["plugins/acexy_plugin.py"], "acexy_tw.web": ["dashboard.html"]},
    install_requires=[
        "incremental>=24.7.2",
        "twisted[tls]>=24.7.0,<27",  # acexy_tw/_twisted_compat.py: checked on this range
        "treq>=24.9.1",
        "klein>=24.8.0",
        "pyopenssl>=24.0.0",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pyyaml>=6",
            "hypothesis>=6.100",
            # tests/e2e/test_packaging.py builds the wheel offline (no build
            # isolation), with this environment's setuptools.
            "setuptools>=77",
        ],
    },
)
