"""ctxstore package (see docs/architecture.md §4).

``state`` is compiled with mypyc when the package is installed (setup.py); importing the package
refuses a compiled module older than its source, as ``raft`` does."""

import os

from raft._build import refuse_stale_builds

refuse_stale_builds(os.path.dirname(__file__))
