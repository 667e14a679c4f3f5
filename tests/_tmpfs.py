"""A disk of a chosen size for tests of what happens when it fills up: a tmpfs mounted inside a
private mount namespace (``unshare -m``: the mount vanishes with the shell that made it). Needs
root; tests skip where :func:`can_mount` is False."""

import subprocess


def can_mount() -> bool:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def in_private_mounts(script: str, env: dict[str, str], timeout: float = 600) -> None:
    """Run the shell ``script`` (it mounts what it needs: ``mount -t tmpfs -o size=N tmpfs DIR``)
    in a mount namespace of its own; it writes what the test reads outside the mounts."""
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, timeout=timeout)
    assert done.returncode == 0, f"the script failed ({done.returncode}):\n{script}"
