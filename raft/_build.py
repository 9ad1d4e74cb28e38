"""Refuses a compiled module (setup.py) older than its source: it would run old code."""

import glob
import os


def _refuse_stale_builds() -> None:
    here = os.path.dirname(__file__)
    for built in glob.glob(os.path.join(here, "*.so")):
        source = os.path.join(here, os.path.basename(built).split(".", 1)[0] + ".py")
        if os.path.exists(source) and os.path.getmtime(source) > os.path.getmtime(built):
            raise ImportError(
                f"{built} is older than {source}: rebuild the compiled Raft core "
                "(make, or pip install -e .) or delete raft/*.so to run it interpreted"
            )


_refuse_stale_builds()
