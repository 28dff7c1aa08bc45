"""A real single-node SLURM for the tests of slurm/*.sh.

If `sinfo` already answers, that cluster is used and nothing is started or stopped. Otherwise, as root, with Debian's
`slurmctld slurmd slurm-client munge` installed (`make test` installs them through tools/setup_test_deps.sh; this
module installs nothing), this writes a private slurm.conf, munge key and state directories under a temporary
directory, starts `munged`, `slurmctld` and `slurmd` in the foreground as child processes, and waits for the node to
be idle. `stop()` cancels the jobs and ends exactly the processes it started.

The node advertises 32 fake GPUs (their device files are copies of /dev/null), so the scripts' `#SBATCH --gres=gpu:N`
lines are accepted as they are, by several jobs at once; the jobs themselves run on the CPU. It also advertises at
least 16 CPUs, whatever it has, so that the tests' one-CPU jobs run side by side: one job's start-up or requeue wait
overlaps another's work. A requeued job may start again after about 6 s (cred_expire=5, SLURM's minimum; a lower
value is refused and 120 s used) instead of SLURM's default 121 s, and the scheduler looks at pending jobs every
second, which keeps the preemption tests short.

    python tests/slurm_cluster.py   # start one, print how to use it, stop it on Ctrl-C or SIGTERM
"""

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel", "munged"]
FAKE_GPUS = 32
FAKE_CPUS = 16
# Job states after which a job (or array task) will not run again.
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why."""


class SlurmNotInstalled(SlurmUnavailable):
    """The SLURM programs are missing (and no running SLURM answers)."""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(env=None):
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10, env=env).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def missing_programs():
    """The SLURM and munge programs that are not on PATH; `make test` installs them (tools/setup_test_deps.sh)."""
    return [b for b in BINARIES if not shutil.which(b)]


class SlurmCluster:
    def __init__(self):
        self.root = None
        self.env = dict(os.environ)
        self.processes = {}  # name -> Popen, only what this object started
        self.started = False
        self.sbatch_args = []  # options every test job needs on this cluster

    # ------------------------------------------------------------------------------------------------------------
    def start(self, timeout=60):
        if _answers():
            self.node = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, env=self.env
            ).stdout.split()[0]
            gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, env=self.env).stdout
            if "gpu" not in gres:  # the scripts' --gres=gpu:N lines would be refused
                self.sbatch_args = ["--gres=none"]
            return self
        missing = missing_programs()
        if missing:
            raise SlurmNotInstalled(
                f"SLURM is not installed (missing {' '.join(missing)}): run tools/setup_test_deps.sh as root, which "
                f"`make test` does, or apt-get install {' '.join(PACKAGES)}"
            )
        if os.geteuid() != 0:
            raise SlurmUnavailable("no SLURM answers, and starting one (SlurmUser=root) needs root")
        self.root = tempfile.mkdtemp(prefix="slurm-test-")
        os.chmod(self.root, 0o755)
        self.node = socket.gethostname().split(".")[0]
        self._write_config()
        self.env["SLURM_CONF"] = self.conf
        self.started = True
        try:
            self._start_daemons(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self):
        r = self.root
        for d in ("state", "spool", "munge", "log", "gpus"):
            os.makedirs(os.path.join(r, d), exist_ok=True)
        os.chmod(os.path.join(r, "munge"), 0o755)
        self.munge_socket = os.path.join(r, "munge", "munge.socket")
        self.munge_key = os.path.join(r, "munge", "munge.key")
        if not os.path.exists(self.munge_key):
            with open(self.munge_key, "wb") as f:
                f.write(os.urandom(1024))
            os.chmod(self.munge_key, 0o400)
        cpus = max(os.cpu_count() or 1, FAKE_CPUS)
        conf = f"""\
# Written by tests/slurm_cluster.py: one node, one partition, everything under {r}.
ClusterName=slurmtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s, minimum 5).
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# Pending jobs are looked at every second; a job whose dependency failed is cancelled instead of pending forever.
SchedulerParameters=sched_interval=1,kill_invalid_depend
# The node's CPUs as configured, not as detected (CPUs= on the NodeName line is more than the machine has).
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MaxJobCount=10000
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        self.conf = os.path.join(r, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        # slurmd drops GPUs without a File and wants device nodes: copies of /dev/null stand in for /dev/nvidia*.
        for i in range(FAKE_GPUS):
            path = os.path.join(r, "gpus", f"fake{i}")
            try:
                os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            except OSError:  # a plain file works too, with an error line in slurmd.log
                open(path, "w").close()
        with open(os.path.join(r, "gres.conf"), "w") as f:
            f.write(f"NodeName={self.node} Name=gpu File={r}/gpus/fake[0-{FAKE_GPUS - 1}]\n")

    def _spawn(self, name, cmd):
        log = open(os.path.join(self.root, "log", f"{name}.out"), "w")
        self.processes[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def _start_daemons(self, timeout):
        r = self.root
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={self.munge_key}",
                f"--pid-file={r}/munge/munged.pid",
                f"--seed-file={r}/munge/munged.seed",
                f"--log-file={r}/log/munged.log",
            ],
        )
        self._wait_for(lambda: os.path.exists(self.munge_socket), 20, "munged")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", self.conf])
        self._wait_for(lambda: self.node_state() == "idle", timeout, "the node to be idle")

    def _wait_for(self, predicate, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode}: {self.logs(name)}")
            if predicate():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"timed out after {timeout} s waiting for {what}: {self.logs()}")

    def logs(self, name=None):
        text = []
        for path in sorted(os.listdir(os.path.join(self.root, "log"))):
            if name is None or path.startswith(name):
                with open(os.path.join(self.root, "log", path), errors="replace") as f:
                    text.append(f"--- {path}\n" + "".join(f.readlines()[-30:]))
        return "\n".join(text)

    def stop(self):
        if not self.started:
            return
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self._quiet(["scancel", "--full", "--user", str(os.getuid())])
            deadline = time.time() + 20
            while time.time() < deadline and self.squeue():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------------------
    def run(self, *cmd, check=True, **kwargs):
        result = subprocess.run(
            [str(c) for c in cmd], capture_output=True, text=True, env=kwargs.pop("env", self.env), **kwargs
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}): {result.stderr}")
        return result

    def _quiet(self, cmd):
        subprocess.run(cmd, capture_output=True, env=self.env, timeout=30)

    def node_state(self):
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=self.env)
        return result.stdout.strip() if result.returncode == 0 else None

    def squeue(self):
        result = self.run("squeue", "-h", "-o", "%i %T", check=False)
        return result.stdout.split("\n") if result.stdout.strip() else []

    def job_env(self, env):
        """env (a whole environment) plus what the SLURM commands need to reach this cluster."""
        return dict(env, SLURM_CONF=self.env["SLURM_CONF"]) if "SLURM_CONF" in self.env else dict(env)

    def sbatch(self, script, *args, env=None, cwd=None, sbatch_args=()):
        """Submit script with extra sbatch options and script arguments; return the job id. env is the whole
        environment sbatch exports to the job (default: this process's)."""
        result = self.run(
            "sbatch",
            "--parsable",
            *self.sbatch_args,
            *sbatch_args,
            script,
            *args,
            env=self.job_env(self.env if env is None else env),
            cwd=cwd,
        )
        return result.stdout.strip().split(";")[0]

    def jobs(self, job_id):
        """`scontrol show job` records of a job (one per array task), as dicts."""
        result = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        records = []
        for line in result.stdout.splitlines():
            if line.strip():
                records.append(dict(re.findall(r"(\w[\w:/]*)=(\S*)", line)))
        return records

    def wait(self, job_id, timeout=180, poll=0.2):
        """Wait until every task of the job is in a final state; return the records."""
        deadline = time.time() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in FINAL_STATES for r in records):
                return records
            if time.time() > deadline:
                raise TimeoutError(
                    f"job {job_id} not finished after {timeout} s: "
                    f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in records]}"
                )
            time.sleep(poll)


if __name__ == "__main__":
    t0 = time.time()
    cluster = SlurmCluster().start()
    print(
        f"SLURM up in {time.time() - t0:.1f} s, node {cluster.node}; "
        f"export SLURM_CONF={cluster.env.get('SLURM_CONF')}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
