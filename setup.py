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
    package_data={"achilles": ["py.typed"]},
    # Upper bounds where we rely on a dependency's private API (achilles/compat/): the
    # newest release tests/unit/test_compat_*.py passed on is below the bound.
    install_requires=[
        "twisted>=22.10,<27",
        "dill>=0.3.6",
        "multiprocess>=0.70.14,<0.71",
        "python-dotenv>=1.0",
        # progress bars (Pool.map(..., progress=True)) that also render in notebooks
        "tqdm>=4.60",
    ],
    extras_require={
        # TLS between server, nodes and controllers (pyOpenSSL, service_identity)
        "tls": ["twisted[tls]>=22.10"],
        "test": ["pytest>=7", "hypothesis>=6", "pytest-timeout>=2", "twisted[tls]>=22.10",
                 "nbclient>=0.7", "nbformat>=5", "ipykernel>=6"],
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
