"""Where the repository is, for tests that run the CLI from it or read its ``configs/`` and ``clusters/``; and
whether a process still holds a run directory."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def holds(run_dir: Path, pid: int) -> bool:
    """Whether process ``pid`` has its working directory or an open file under ``run_dir`` (False once it is
    gone or unreadable)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        paths = [proc.cwd()] + [f.path for f in proc.open_files()]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(Path(p).is_relative_to(run_dir) for p in paths)
