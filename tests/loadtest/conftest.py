import sys
from pathlib import Path

# `loadtest` is a top-level package of the repository, not of the installed sinkserve distribution.
REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
