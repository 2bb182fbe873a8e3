from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="achilles",
    version="0.1.0",
    description="Distributed multiprocessing.Pool: map/imap/imap_unordered across a cluster",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["achilles", "achilles.*"]),
    package_data={"achilles": ["py.typed"], "achilles.web": ["static/*"]},
    # Upper bounds where we rely on a dependency's private API (achilles/compat/): each is
    # just above the newest release tests/unit/test_compat_*.py passed on (Twisted 26.10;
    # multiprocess 0.70.15 to 0.70.19; 0.70.14 cannot start a process on Python 3.11.7).
    install_requires=[
        # [tls]: pyOpenSSL and service_identity; TLS is on by default off loopback
        "twisted[tls]>=22.10,<26.11",
        "dill>=0.3.6",
        "multiprocess>=0.70.15,<0.70.20",
        "python-dotenv>=1.0",
        # progress bars (Pool.map(..., progress=True)) that also render in notebooks
        "tqdm>=4.60",
    ],
    extras_require={
        # TLS is part of the default install now; the extra stays so that old
        # instructions (pip install "achilles[tls]") still work
        "tls": [],
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "pytest-timeout>=2",
            "twisted[tls]>=22.10",
            "nbclient>=0.7",
            "nbformat>=5",
            "ipykernel>=6",
        ],
        # the checks .ci/run makes before the tests (pinned: a new rule must not fail CI)
        "lint": ["ruff==0.17.6", "mypy==2.4.1"],
    },
    entry_points={
        "console_scripts": [
            "achilles=achilles.cli:main_entry",
            "achilles-server=achilles.cli:server_main",
            "achilles-node=achilles.cli:node_main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Framework :: Twisted",
        "License :: OSI Approved :: MIT License",
    ],
)
