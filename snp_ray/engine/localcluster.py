"""Stop the local Ray head that ``make cluster`` started, and nothing else (``make cluster-stop``).

``ray stop`` stops every Ray process of the user on the machine: another cluster, a test
session's in-process Ray. ``make cluster`` gives its head a ``--temp-dir`` of its own; this finds
the processes whose command line names that folder (GCS, raylet, dashboard, ...) plus all their
descendants (workers, agents, the job drivers, whose titles no longer name it), and stops them
as ``ray stop`` does: SIGTERM in its order (raylet, the rest, GCS), SIGKILL for the stragglers.

Usage: python -m snp_ray.engine.localcluster stop TEMP_DIR [--grace 16]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process this user can read."""
    out: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if not (name.isascii() and name.isdigit()):
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])   # the name field may hold spaces
        out[int(name)] = (ppid, cmd)
    return out


def cluster_pids(temp_dir: str) -> list[int]:
    """The processes of the Ray cluster whose ``--temp-dir`` is ``temp_dir``, with descendants."""
    temp_dir = os.path.abspath(temp_dir).rstrip("/")
    procs = _processes()
    me = os.getpid()
    roots = {pid for pid, (_, cmd) in procs.items()
             if pid != me and (f"={temp_dir}/" in cmd or f"={temp_dir} " in cmd)}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found or pid == me:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"   # a zombie has exited
    except OSError:
        return False


def _bucket(cmd: str) -> int:
    """The order ``ray stop`` uses: the raylet first, the GCS last, everything else between."""
    exe = cmd.split(" ", 1)[0]
    return 0 if exe.endswith("/raylet") else 2 if exe.endswith("/gcs_server") else 1


def stop(temp_dir: str, grace_s: float = 16.0) -> tuple[list[int], list[str]]:
    """Stop the cluster's processes in ``ray stop``'s order (raylet, the rest, GCS): SIGTERM, then
    SIGKILL for any still alive after a third of ``grace_s``. Returns the pids found and the
    command lines of those that had to be killed."""
    procs = _processes()
    pids = cluster_pids(temp_dir)
    killed: list[str] = []
    for bucket in range(3):
        group = [p for p in pids if _bucket(procs[p][1]) == bucket and _alive(p)]
        for pid in group:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s / 3
        while time.monotonic() < deadline and any(_alive(p) for p in group):
            time.sleep(0.1)
        for pid in group:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(procs[pid][1][:60].strip())
                except OSError:
                    pass
    return pids, killed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m snp_ray.engine.localcluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stop", help="stop the cluster started with --temp-dir TEMP_DIR")
    s.add_argument("temp_dir")
    s.add_argument("--grace", type=float, default=16.0,
                   help="seconds to wait for a graceful exit before SIGKILL (as `ray stop`'s)")
    a = p.parse_args(argv)
    pids, killed = stop(a.temp_dir, a.grace)
    if killed:
        print(f"killed {len(killed)} that outlived SIGTERM by {a.grace:g} s: {'; '.join(killed)}")
    if pids:
        print(f"stopped the Ray cluster in {a.temp_dir} ({len(pids)} processes)")
    else:
        print(f"no Ray cluster is running in {a.temp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
