"""Refuses a compiled module (setup.py) of this package older than its source: it would run old
code.  The same check as ``raft/_build.py``'s; ``wire`` imports no other package of the project
(tests/test_layering.py), so it keeps its own copy."""

import glob
import os


def refuse_stale_builds(package_dir: str) -> None:
    for built in glob.glob(os.path.join(package_dir, "*.so")):
        source = os.path.join(package_dir, os.path.basename(built).split(".", 1)[0] + ".py")
        if os.path.exists(source) and os.path.getmtime(source) > os.path.getmtime(built):
            raise ImportError(
                f"{built} is older than {source}: rebuild the compiled modules "
                f"(make, or pip install -e .) or delete {package_dir}/*.so to run them interpreted"
            )


refuse_stale_builds(os.path.dirname(__file__))
