"""Helpers shared by the test folders (not test modules): tests import them as ``support.<module>``;
pytest fixtures stay in the ``conftest.py`` files.

- ``paths``: the repository root, for tests that run the CLI or read ``configs/`` and ``clusters/``.
- ``jobs``: the tiny V4 job, the shared pool of Ray rank workers, and a Supervisor runner.
- ``cli``: the ``v4train`` command line as a subprocess, with a clean environment.
- ``spawn``: gloo rank processes with a deadline, for the multi-process unit tests.
- ``model``: a tiny attention config and builders for the model tests.
- ``attention_reference``: a brute-force, test-size reference of a whole CSA / HCA / SWA layer.
- ``toy_pipeline``: a toy stage model and its single-process reference for the pipeline schedules.
"""
