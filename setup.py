from setuptools import find_packages, setup

setup(
    name="acexy-tw",
    use_incremental=True,
    description="AceStream proxy on Twisted: one engine session per content, many players, flow control",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/acexy_plugin.py"], "acexy_tw.web": ["dashboard.html"]},
    setup_requires=["incremental>=24.7.2"],
    install_requires=[
        "incremental>=24.7.2",
        "twisted[tls]>=24.7.0,<27",  # acexy_tw/_twisted_compat.py: checked on this range
        "treq>=24.9.1",
        "klein>=24.8.0",
        "pyopenssl>=24.0.0",
        "prometheus_client>=0.20",
    ],
    extras_require={"test": ["pytest>=8", "pytest-twisted>=1.14", "pyyaml>=6", "hypothesis>=6.100"]},
)
