"""A real two-node Slurm cluster on this one host, owned by the test that starts it.

munged, slurmctld and one slurmd per node run in the foreground as children of the test
process, each started with its own private paths: a munge socket and key, a ``slurm.conf``
(handed to every client through ``SLURM_CONF``), state, spool and log directories, and
ports picked free at start. Nothing under ``/etc`` is read or written, so a cluster that
someone else runs on this host (the default ports, ``/etc/slurm``) is left alone.

:meth:`SlurmCluster.stop` cancels the jobs, stops every daemon by its pid (SIGTERM, then
SIGKILL) and ends, by pid, any job process still carrying this cluster's ``SLURM_CONF`` in
its environment; it runs even when a test fails. The nodes are names in ``slurm.conf``
only: they all have ``NodeAddr=127.0.0.1``, and a launch script reaches a node through that
address (``scontrol show node``), as Slurm itself does.

A watchdog process started with the cluster does the same if the test process dies without
stopping it (killed, or timed out in CI).

Needs root (slurmd starts job steps as the submitting user) and the Debian packages
``slurmctld slurmd slurm-client munge``; ``.ci/run`` installs them.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def unavailable() -> str | None:
    """Why this host cannot run the cluster (None when it can)."""
    missing = [c for c in COMMANDS if not shutil.which(c, path=_sbin_path())]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} not found): `bash .ci/run` as root "
            f"installs it (apt-get install {' '.join(PACKAGES)}); "
            '`pytest -m "not cluster"` leaves these tests out'
        )
    if os.geteuid() != 0:
        return (
            "the cluster tests start slurmd, which must run as root: run them as root, "
            'or leave them out with `pytest -m "not cluster"`'
        )
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on the loopback interface right now.

    They are drawn below the kernel's ephemeral range (``ip_local_port_range``, 32768 and up
    by default), which is where every outgoing connection and every ``bind(port 0)`` on the
    host gets its port: a daemon or a launcher binding one of these later cannot find it
    taken by a connection some other test opened in between.
    """
    low, high = 20000, _ephemeral_low()
    rng = random.Random()  # seeded from os.urandom: test workers draw independently
    ports: list[int] = []
    for _ in range(200 * count):
        port = rng.randrange(low, high)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"found only {len(ports)} of {count} free ports in [{low}, {high})")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(int(f.read().split()[0]), 21000)
    except (OSError, ValueError, IndexError):
        return 32768


class SlurmCluster:
    """slurmctld + ``len(nodes)`` slurmd on this host; jobs run as the current user."""

    def __init__(
        self,
        nodes: tuple[str, ...] = ("n1", "n2"),
        cpus_per_node: int = 2,
        hostnames: dict[str, str] | None = None,
    ):
        self.nodes = nodes
        # A node's own host name (its slurmd, and every job process it starts, in a UTS
        # namespace of their own), as on a real cluster; the host's name where not given.
        self.hostnames = hostnames or {}
        self.cpus_per_node = cpus_per_node
        # munged wants every directory above its socket searchable by all (pytest's
        # tmp_path is 0700), so the cluster lives in its own 0755 folder under /tmp.
        self.root = Path(tempfile.mkdtemp(prefix="tst-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge.socket"
        self.daemons: dict[str, subprocess.Popen] = {}
        self.watchdog: subprocess.Popen | None = None

    # ------------------------------------------------------------------ start and stop

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        self.watchdog = subprocess.Popen(
            [sys.executable, __file__, str(os.getpid()), str(self.conf), str(self.root)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        for sub in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            "munged",
            ["munged", "--foreground", f"--socket={self.socket}", f"--key-file={key}",
             f"--pid-file={self.root / 'munged.pid'}", f"--seed-file={self.root / 'munged.seed'}",
             f"--log-file={self.root / 'log' / 'munged.log'}"],
        )  # fmt: skip
        self._wait(lambda: self.socket.exists(), timeout_s, "munged to create its socket")
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        for node in self.nodes:
            argv = ["slurmd", "-D", "-N", node]
            if node in self.hostnames:
                argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                        self.hostnames[node], *argv]  # fmt: skip
            self._spawn(f"slurmd-{node}", argv)
        self._wait(self._all_idle, timeout_s, f"nodes {', '.join(self.nodes)} to be idle")
        return self

    def _write_conf(self) -> None:
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            "ClusterName=tsttest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A requeued job may start again once its old credentials expire (the default
            # 120 s lifetime would make each requeue wait two minutes).
            f"AuthInfo=socket={self.socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd'}-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "MailProg=/bin/true",
            "MpiDefault=none",
            # Containers here have no usable cgroups: track job processes by parentage.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            # Schedule every 2 s (a requeued job starts as soon as it may, not a minute later).
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres",
            "ReturnToService=2",
            # Completed jobs stay visible to `scontrol show job` for the whole test.
            "MinJobAge=3600",
        ]
        for node, port in zip(self.nodes, node_ports, strict=True):
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN"
            )
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
            "State=UP OverSubscribe=YES"
        )
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (lives with the daemon)
        self.daemons[name] = subprocess.Popen(
            argv,
            env=self.env(PATH=_sbin_path()),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the test's terminal goes to pytest only
        )
        log.close()

    def _all_idle(self) -> bool:
        for name, proc in self.daemons.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{self.logs()}")
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in self.nodes)

    def cancel_all(self, timeout_s: float = 30.0) -> None:
        """Kill every job of this cluster and wait until none is left."""
        self.run("scancel", "--full", "--signal=KILL", "--user", _user(), check=False)
        self.run("scancel", "--user", _user(), check=False)  # pending ones too
        with contextlib.suppress(TimeoutError):
            self._wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), timeout_s)

    def stop(self) -> None:
        """Cancel every job, stop the daemons by pid, end leftover job processes by pid."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.cancel_all(20)
        for name in reversed(list(self.daemons)):  # slurmd, slurmctld, then munged
            _terminate(self.daemons[name])
        for proc in self.job_processes():
            _terminate_pid(proc.pid)
        if self.watchdog is not None:
            _terminate(self.watchdog)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def job_processes(self, **match: str) -> list[psutil.Process]:
        """Live processes started through this cluster, whose environment holds ``match``
        (e.g. ``SLURMD_NODENAME="n2"``): job tasks and what they started, and slurmstepd."""
        daemons = {d.pid for d in self.daemons.values()}
        return [p for p in _processes_of(str(self.conf), **match) if p.pid not in daemons]

    # ------------------------------------------------------------------ clients

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(SLURM_CONF=str(self.conf), **extra)
        return env

    def run(self, *argv: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, env=self.env(**env), capture_output=True, text=True, check=check, timeout=60
        )

    def sbatch(self, *argv: str, cwd: str | Path, **env: str) -> int:
        """Submit; return the job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *argv],
            env=self.env(**env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, RunTime, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout_s: float, states=FINISHED) -> dict[str, str]:
        """Wait until the job is in one of ``states``; return its record."""
        record: dict[str, str] = {}

        def reached() -> bool:
            nonlocal record
            record = self.job(job_id)
            return record.get("JobState") in states

        try:
            self._wait(reached, timeout_s, f"job {job_id} to reach {sorted(states)}", poll_s=0.5)
        except TimeoutError as error:
            raise TimeoutError(f"{error}; it is {record.get('JobState')}") from None
        return record

    def logs(self) -> str:
        """The daemons' own logs (the tail of each), for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    @staticmethod
    def _wait(ready, timeout_s: float, what: str = "", poll_s: float = 0.25) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
            time.sleep(poll_s)


def _processes_of(conf: str, **match: str) -> list[psutil.Process]:
    """Live processes (not this one) with ``SLURM_CONF=conf`` and ``match`` in their
    environment: the daemons (started with it) and every job process."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("SLURM_CONF") != conf or proc.pid == os.getpid():
            continue
        if all(env.get(k) == v for k, v in match.items()):
            found.append(proc)
    return found


def _watch(owner: int, conf: str, root: str) -> None:
    """The watchdog: once ``owner`` (the test process) is gone, kill every process of the
    cluster by pid and remove its folder (SlurmCluster.stop ends the watchdog when done)."""
    while os.getppid() == owner:
        time.sleep(1)
    for proc in _processes_of(conf):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    shutil.rmtree(root, ignore_errors=True)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


def _terminate_pid(pid: int, grace_s: float = 5.0) -> None:
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(grace_s)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.NoSuchProcess:
        pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2], sys.argv[3])
