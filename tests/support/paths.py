"""Where the repository is, for tests that run the CLI from it or read its ``configs/`` and ``clusters/``."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
