#!/usr/bin/env python3
"""Measure securevol against a plain directory, gocryptfs and securefs on this machine.

Each round mounts every filesystem afresh, then runs each selected workload on
all of them, one filesystem after another, before it moves to the next
workload. The order of the filesystems rotates from round to round, so none of
them always runs first or last; by default there are as many rounds as
filesystems, so each runs once in every position. Before each timed step the
script waits until the disk has been quiet for a second, so that one
filesystem's writeback does not count against the next. The report gives the median
over the rounds, its ratio to the plain directory, and whether securevol meets
its targets.

Workloads (``--workloads``, all by default):

  seqwrite    write one file of --size bytes in 1 MiB writes, then fsync it
  coldread    read that file back after a remount and a drop of the page cache
  smallfiles  create, stat and delete --files files of 1 KiB, each phase timed alone
  random4k    fio random 4 KiB reads, then writes with a final fsync (ioengine=psync)
  untar       extract a tarball of a real source tree, then sync
  memory      peak RSS (VmHWM) of each FUSE process while it served the round

CPU placement (``--placement``): by default the scheduler places the
benchmark and each FUSE process. On a VM where waking another CPU is
expensive, whether a FUSE process happens to share a CPU with its client
decides the small-file figures more than the filesystem does
(docs/benchmarks.md, "CPU placement"). ``together`` pins the benchmark, its
tar and fio, and every FUSE process to one CPU. ``apart`` pins the
FUSE processes to a CPU other than the benchmark's.

The securevol mount is made the way the daemon makes it: securevol.mounter
starts ``python -m securevol.mount`` and hands it a random DEK over a pipe.

Run it as root, because it mounts FUSE filesystems and drops the page cache,
with the project's virtualenv:

    .venv/bin/python scripts/bench.py             # full run
    .venv/bin/python scripts/bench.py --quick     # small sizes and one round: a smoke run

docs/benchmarks.md records the figures of a full run and how they were taken.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:
    from securevol.crypto import DataKey
    from securevol.mounter import FuseLaunch, Mounter, is_mounted
except ImportError:
    sys.exit("bench: securevol is not importable; run this script with the project's .venv/bin/python.")

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
CHUNK = MIB
SMALL_FILE_SIZE = 1024
FIO_BLOCK = 4096

# How long the disks must have written nothing before a timed step starts, and the longest wait for that.
SETTLE_QUIET_SECONDS = 1.0
SETTLE_TIMEOUT_SECONDS = 30.0

MOUNT_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 60.0
PROFILE_RATE = 200  # py-spy samples per second

ALL_FILESYSTEMS = ("plain", "securevol", "gocryptfs", "securefs")
PLACEMENTS = ("free", "together", "apart")
ALL_WORKLOADS = ("seqwrite", "coldread", "smallfiles", "random4k", "untar", "memory")


@dataclass(frozen=True)
class Metric:
    name: str
    workload: str
    unit: str
    description: str


# Every speed metric is a rate, so higher is better and a ratio above 1 beats
# the plain directory. Peak RSS is the one metric where lower is better.
METRICS = (
    Metric("seq_write", "seqwrite", "MiB/s", "sequential write with fsync"),
    Metric("cold_read", "coldread", "MiB/s", "cold sequential read"),
    Metric("create", "smallfiles", "files/s", "small files created"),
    Metric("stat", "smallfiles", "files/s", "small files stat'ed (cold)"),
    Metric("delete", "smallfiles", "files/s", "small files deleted"),
    Metric("rand_read", "random4k", "IOPS", "random 4 KiB reads (cold)"),
    Metric("rand_write", "random4k", "IOPS", "random 4 KiB writes + fsync"),
    Metric("untar", "untar", "entries/s", "untar of a source tree + sync"),
    Metric("peak_rss", "memory", "MiB", "peak RSS of the FUSE process"),
)
METRIC_BY_NAME = {metric.name: metric for metric in METRICS}


@dataclass(frozen=True)
class Target:
    """securevol's median must reach *factor* times the best median of *references*."""

    metric: str
    factor: float
    references: tuple[str, ...]


TARGETS = (
    Target("seq_write", 1.5, ("gocryptfs",)),
    Target("cold_read", 1.5, ("gocryptfs",)),
    Target("create", 1.0, ("gocryptfs",)),
    Target("stat", 1.0, ("gocryptfs",)),
    Target("delete", 1.0, ("gocryptfs",)),
    Target("rand_read", 1.0, ("gocryptfs", "securefs")),
    Target("rand_write", 1.0, ("gocryptfs", "securefs")),
    Target("untar", 1.0, ("gocryptfs", "securefs")),
)


@dataclass
class Config:
    size: int
    rounds: int
    files: int
    fio_size: int
    fio_io_size: int
    tar_source: Path
    workloads: tuple[str, ...]
    filesystems: tuple[str, ...]
    workdir_parent: Path | None
    profile_dir: Path | None
    settle_timeout: float = SETTLE_TIMEOUT_SECONDS
    placement: "Placement | None" = None
    tarball: Path | None = None
    tar_entries: int = 0
    tar_bytes: int = 0


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- page cache and sync ---------------------------------------------------------------------------


def drop_page_cache() -> None:
    """Write back dirty pages, then drop the clean page cache, dentries and inodes of every filesystem."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def sync_twice() -> None:
    # The first sync(2) makes the kernel write back the dirty pages of FUSE
    # mounts, and their processes write them into the backing store's page
    # cache. The second sync(2) flushes those pages to the disk.
    os.sync()
    os.sync()


def make_cold(fs: "Filesystem") -> None:
    """Empty every cache between a workload and *fs*'s data: the FUSE process's own and the kernel's."""
    os.sync()
    fs.remount()
    drop_page_cache()
    settle_disk(fs.config.settle_timeout)


def settle_disk(timeout: float) -> None:
    """Wait until no disk has written a sector for SETTLE_QUIET_SECONDS, or *timeout* seconds passed.

    sync(2) returns before the backing filesystem's journal is checkpointed,
    and that work would count against whichever filesystem runs next. The
    position in the round still changes small-file results on the test VM
    (docs/benchmarks.md), which the default of one round per filesystem evens out.
    A *timeout* of 0 only syncs.
    """
    os.sync()
    if timeout <= 0:
        return
    start = time.monotonic()
    written = _sectors_written()
    quiet_since = start
    while time.monotonic() - start < timeout:
        time.sleep(0.1)
        now_written = _sectors_written()
        if now_written != written:
            written = now_written
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_QUIET_SECONDS:
            return
    progress(f"the disks kept writing for {timeout:.0f} s; measuring anyway")


def _sectors_written() -> int:
    """Return the sectors written so far by all block devices, from /proc/diskstats (field 10)."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            total += int(line.split()[9])
    return total


def read_vm_hwm_kib(pid: int) -> int:
    """Return the peak resident set size of *pid* in KiB, 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


# --- CPU placement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """The CPUs the benchmark (the client) and the FUSE processes may use; None leaves it to the scheduler."""

    mode: str
    client_cpus: frozenset[int] | None = None
    fuse_cpus: frozenset[int] | None = None

    @classmethod
    def choose(cls, mode: str, allowed: set[int]) -> "Placement":
        cpus = sorted(allowed)
        if mode == "together":
            return cls(mode, frozenset(cpus[:1]), frozenset(cpus[:1]))
        if mode == "apart":
            if len(cpus) < 2:
                raise ValueError("--placement apart needs at least two CPUs; allow the script two, or use "
                                 "together or free")
            return cls(mode, frozenset(cpus[:1]), frozenset(cpus[1:2]))
        return cls(mode)

    def describe(self) -> dict:
        def listed(cpus: frozenset[int] | None) -> list[int] | None:
            return sorted(cpus) if cpus is not None else None
        return {"mode": self.mode, "client_cpus": listed(self.client_cpus),
                "fuse_cpus": listed(self.fuse_cpus)}


def pin_process(pid: int, cpus: frozenset[int]) -> None:
    """Restrict every thread of *pid* to *cpus*; threads it starts later inherit the setting."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            continue  # the thread ended while we listed them


def threads_cpus(pid: int) -> set[int]:
    """Return the union of the CPUs the threads of *pid* may run on."""
    cpus: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            cpus |= os.sched_getaffinity(int(tid))
        except ProcessLookupError:
            continue
    return cpus


# --- filesystems under test ------------------------------------------------------------------------


class Filesystem:
    """One filesystem under test: set up once, mounted once per round, remounted to empty its caches."""

    name = ""

    def __init__(self, base: Path, config: Config) -> None:
        self.base = base
        self.config = config
        self.root = base / "mnt"
        self.round_peak_rss_kib = 0
        # The CPUs this filesystem's FUSE processes were allowed to use when sampled, for the report.
        self.seen_fuse_cpus: set[int] = set()

    def create(self) -> None:
        self.root.mkdir(parents=True)

    def mount(self) -> None:
        pass

    def unmount(self) -> None:
        pass

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def cleanup(self) -> None:
        """End whatever this filesystem left running; safe to call in any state."""

    @property
    def fuse_pid(self) -> int | None:
        return None

    def sample_memory(self) -> None:
        if self.fuse_pid is not None:
            self.round_peak_rss_kib = max(self.round_peak_rss_kib, read_vm_hwm_kib(self.fuse_pid))
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                self.seen_fuse_cpus |= threads_cpus(self.fuse_pid)

    def place_fuse_process(self) -> None:
        """Pin the FUSE process just mounted to the CPUs of --placement, if it names any."""
        placement = self.config.placement
        if placement is not None and placement.fuse_cpus is not None and self.fuse_pid is not None:
            pin_process(self.fuse_pid, placement.fuse_cpus)

    def take_round_peak_rss_mib(self) -> float | None:
        """Return the peak RSS of this round's FUSE processes and start counting the next round."""
        peak = self.round_peak_rss_kib
        self.round_peak_rss_kib = 0
        return peak / 1024 if peak else None

    @contextlib.contextmanager
    def profiled(self, label: str) -> Iterator[None]:
        yield


class PlainDirectory(Filesystem):
    """The baseline: a directory on the same filesystem as the others' backing stores."""

    name = "plain"


class SecurevolFilesystem(Filesystem):
    """A securevol volume, mounted through securevol.mounter exactly as the daemon mounts it."""

    name = "securevol"

    def __init__(self, base: Path, config: Config) -> None:
        super().__init__(base, config)
        self.mounter = Mounter(mount_timeout=MOUNT_TIMEOUT, stop_timeout=UNMOUNT_TIMEOUT)
        self.dek = DataKey(os.urandom(32))
        self.launch = FuseLaunch(
            volume="bench",
            volume_id=os.urandom(16).hex(),
            backing=base / "backing",
            mountpoint=self.root,
            log_file=base / "fuse.log",
            log_level="INFO",
        )
        self.pid: int | None = None
        self.profile_count = 0

    def create(self) -> None:
        super().create()
        self.launch.backing.mkdir(mode=0o700)

    def mount(self) -> None:
        self.pid = self.mounter.start(self.launch, self.dek)
        self.place_fuse_process()

    def unmount(self) -> None:
        if self.pid is None:
            return
        self.sample_memory()
        self.mounter.stop(self.pid, self.root)
        self.pid = None

    def cleanup(self) -> None:
        self.mounter.clear_stale(self.pid, self.root)
        self.pid = None

    @property
    def fuse_pid(self) -> int | None:
        return self.pid

    @contextlib.contextmanager
    def profiled(self, label: str) -> Iterator[None]:
        """Sample the FUSE process with py-spy while the block runs, if --profile is set."""
        if self.config.profile_dir is None or self.pid is None:
            yield
            return

        self.profile_count += 1
        output = self.config.profile_dir / f"{self.profile_count:03d}-{label}.txt"
        spy = subprocess.Popen(
            [
                _py_spy_path(),
                "record", "--pid", str(self.pid), "--rate", str(PROFILE_RATE), "--nonblocking",
                "--format", "raw", "--output", str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # py-spy needs a moment to attach before the workload starts
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)


def _py_spy_path() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        sys.exit("bench: --profile needs py-spy; install it with .venv/bin/pip install py-spy.")
    return found


class ProcessFilesystem(Filesystem):
    """A reference FUSE filesystem whose process runs in the foreground as our child."""

    def __init__(self, base: Path, config: Config) -> None:
        super().__init__(base, config)
        self.cipher_dir = base / "cipher"
        self.key_file = base / "key"
        self.process: subprocess.Popen | None = None

    def create(self) -> None:
        super().create()
        self.cipher_dir.mkdir(mode=0o700)
        # A random throwaway secret in a file keeps it out of the process arguments.
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w") as f:
            f.write(os.urandom(24).hex())
        subprocess.run(self.init_command(), check=True, capture_output=True)

    def init_command(self) -> list[str]:
        raise NotImplementedError

    def mount_command(self) -> list[str]:
        raise NotImplementedError

    def mount(self) -> None:
        log_fd = os.open(self.base / "fuse.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            self.process = subprocess.Popen(self.mount_command(), stdout=log_fd, stderr=log_fd)
        finally:
            os.close(log_fd)
        self._wait_until_mounted()
        self.place_fuse_process()

    def _wait_until_mounted(self) -> None:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.root):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.process.returncode} before it "
                                   f"mounted; see {self.base / 'fuse.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not mount within {MOUNT_TIMEOUT:g} s; "
                                   f"see {self.base / 'fuse.log'}")
            time.sleep(0.02)

    def unmount(self) -> None:
        if self.process is None:
            return
        self.sample_memory()
        subprocess.run(["fusermount3", "-u", str(self.root)], check=True, capture_output=True)
        self.process.wait(timeout=UNMOUNT_TIMEOUT)
        self.process = None

    def cleanup(self) -> None:
        if is_mounted(self.root):
            result = subprocess.run(["fusermount3", "-u", str(self.root)], capture_output=True)
            if result.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(self.root)], capture_output=True)
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    @property
    def fuse_pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Gocryptfs(ProcessFilesystem):
    name = "gocryptfs"

    def init_command(self) -> list[str]:
        # -scryptn 10 only shortens the key derivation at mount; it does not change I/O speed.
        return ["gocryptfs", "-init", "-q", "-passfile", str(self.key_file), "-scryptn", "10",
                str(self.cipher_dir)]

    def mount_command(self) -> list[str]:
        return ["gocryptfs", "-fg", "-q", "-passfile", str(self.key_file), str(self.cipher_dir),
                str(self.root)]


class Securefs(ProcessFilesystem):
    name = "securefs"

    def init_command(self) -> list[str]:
        # PBKDF2 with few rounds keeps each mount quick (argon2id takes seconds); it only
        # derives the master key and does not change I/O speed.
        return ["securefs", "create", "--keyfile", str(self.key_file),
                "--pbkdf", "pkcs5-pbkdf2-hmac-sha256", "--rounds", "1000", str(self.cipher_dir)]

    def mount_command(self) -> list[str]:
        return ["securefs", "mount", "--keyfile", str(self.key_file), str(self.cipher_dir), str(self.root)]


FILESYSTEM_CLASSES: dict[str, type[Filesystem]] = {
    cls.name: cls for cls in (PlainDirectory, SecurevolFilesystem, Gocryptfs, Securefs)
}


# --- workloads -------------------------------------------------------------------------------------
# Each workload runs on one mounted filesystem and returns {metric name: value}.
# Set-up and clean-up steps stay outside the timed sections.


def write_file(path: Path, size: int) -> float:
    """Write *size* bytes of random data to *path* in 1 MiB writes and fsync it; return the seconds taken."""
    chunk = memoryview(os.urandom(CHUNK))
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        written = 0
        while written < size:
            written += os.write(fd, chunk[: min(CHUNK, size - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def read_file(path: Path) -> tuple[int, float]:
    """Read *path* to its end in 1 MiB reads; return the bytes read and the seconds taken."""
    buffer = bytearray(CHUNK)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            total += count
    return total, time.perf_counter() - start


def seqwrite(fs: Filesystem, config: Config) -> dict[str, float]:
    path = fs.root / "sequential.bin"
    with fs.profiled("seq_write"):
        seconds = write_file(path, config.size)
    if "coldread" not in config.workloads:
        path.unlink()
    return {"seq_write": config.size / MIB / seconds}


def coldread(fs: Filesystem, config: Config) -> dict[str, float]:
    path = fs.root / "sequential.bin"
    if not path.exists() or path.stat().st_size != config.size:
        write_file(path, config.size)
    make_cold(fs)

    with fs.profiled("cold_read"):
        total, seconds = read_file(path)
    if total != config.size:
        raise RuntimeError(f"{fs.name}: read {total} bytes of {path.name}, expected {config.size}")

    path.unlink()
    return {"cold_read": total / MIB / seconds}


def smallfiles(fs: Filesystem, config: Config) -> dict[str, float]:
    directory = fs.root / "small"
    directory.mkdir()
    paths = [os.path.join(directory, f"file{i:05d}") for i in range(config.files)]
    payload = os.urandom(SMALL_FILE_SIZE)

    with fs.profiled("create"):
        start = time.perf_counter()
        for path in paths:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.write(fd, payload)
            os.close(fd)
        sync_twice()
        create_seconds = time.perf_counter() - start

    make_cold(fs)
    with fs.profiled("stat"):
        start = time.perf_counter()
        for path in paths:
            os.stat(path)
        stat_seconds = time.perf_counter() - start

    with fs.profiled("delete"):
        start = time.perf_counter()
        for path in paths:
            os.unlink(path)
        sync_twice()
        delete_seconds = time.perf_counter() - start

    directory.rmdir()
    return {
        "create": config.files / create_seconds,
        "stat": config.files / stat_seconds,
        "delete": config.files / delete_seconds,
    }


def run_fio(path: Path, mode: str, seed: int, config: Config) -> float:
    """Run one fio job of random 4 KiB *mode* ("randread" or "randwrite") on *path*; return its IOPS.

    fio's random map visits each block at most once, and --io_size is a
    quarter of the file, so no read is served from pages an earlier read
    brought in. The write job's runtime includes its final fsync. The job
    runs as a thread (--thread), because a forked job process outlived its
    parent when an interrupt ended the benchmark.
    """
    command = [
        "fio", "--name=bench", f"--filename={path}", f"--size={config.fio_size}",
        f"--io_size={config.fio_io_size}", f"--bs={FIO_BLOCK}", f"--rw={mode}",
        "--ioengine=psync", "--invalidate=1", f"--randseed={seed}", "--output-format=json", "--thread",
    ]
    if mode == "randwrite":
        command.append("--end_fsync=1")
    result = subprocess.run(command, check=True, capture_output=True, text=True)

    # fio may print warnings before its JSON document.
    report = json.loads(result.stdout[result.stdout.index("{"):])
    job = report["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio {mode} on {path} failed with error {job['error']}")
    side = job["read" if mode == "randread" else "write"]
    return side["io_bytes"] / FIO_BLOCK / (side["runtime"] / 1000)


def random4k(fs: Filesystem, config: Config) -> dict[str, float]:
    path = fs.root / "random.bin"
    write_file(path, config.fio_size)

    make_cold(fs)
    with fs.profiled("rand_read"):
        read_iops = run_fio(path, "randread", 1, config)

    # A different seed and a cold cache again: the write job must not find
    # the blocks the read job just brought in.
    make_cold(fs)
    with fs.profiled("rand_write"):
        write_iops = run_fio(path, "randwrite", 2, config)

    path.unlink()
    return {"rand_read": read_iops, "rand_write": write_iops}


def untar(fs: Filesystem, config: Config) -> dict[str, float]:
    destination = fs.root / "untar"
    destination.mkdir()
    read_file(config.tarball)  # the tarball is read from the page cache, not the disk, in every run

    with fs.profiled("untar"):
        start = time.perf_counter()
        subprocess.run(["tar", "-xf", str(config.tarball), "-C", str(destination)], check=True)
        sync_twice()
        seconds = time.perf_counter() - start

    shutil.rmtree(destination)
    return {"untar": config.tar_entries / seconds}


WORKLOADS: dict[str, Callable[[Filesystem, Config], dict[str, float]]] = {
    "seqwrite": seqwrite,
    "coldread": coldread,
    "smallfiles": smallfiles,
    "random4k": random4k,
    "untar": untar,
}


def prepare_tarball(config: Config, workdir: Path) -> None:
    """Pack --tar-source into a tarball on the plain filesystem, once for the whole run."""
    source = config.tar_source.resolve()
    config.tarball = workdir / "source.tar"
    subprocess.run(["tar", "-C", str(source.parent), "-cf", str(config.tarball), source.name], check=True)
    config.tar_bytes = config.tarball.stat().st_size
    with tarfile.open(config.tarball) as archive:
        config.tar_entries = sum(1 for _ in archive)


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Results:
    # values[filesystem][metric] is a list with one value per round.
    values: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    # The CPUs each filesystem's FUSE processes were allowed to use while they served.
    fuse_cpus: dict[str, list[int]] = field(default_factory=dict)

    def add(self, filesystem: str, metric: str, value: float) -> None:
        self.values[filesystem][metric].append(value)

    def median(self, filesystem: str, metric: str) -> float | None:
        values = self.values.get(filesystem, {}).get(metric)
        return statistics.median(values) if values else None


def size_text(size: int) -> str:
    """Return *size* bytes as whole MiB, or as KiB below 1 MiB."""
    if size < MIB:
        return f"{size / 1024:,.0f} KiB"
    return f"{size / MIB:,.0f} MiB"


def rotated(items: list, round_no: int) -> list:
    shift = round_no % len(items)
    return items[shift:] + items[:shift]


def run_benchmark(config: Config) -> Results:
    if config.placement.client_cpus is not None:
        # tar and fio, started by this process, inherit the setting.
        os.sched_setaffinity(0, config.placement.client_cpus)
    workdir = Path(tempfile.mkdtemp(prefix="securevol-bench-", dir=config.workdir_parent))
    filesystems = [FILESYSTEM_CLASSES[name](workdir / name, config) for name in config.filesystems]
    results = Results()
    progress(f"working in {workdir}")
    progress(f"sizes: sequential file {size_text(config.size)}, {config.files:,} small files, "
             f"fio file {size_text(config.fio_size)} ({size_text(config.fio_io_size)} per job), "
             f"{config.rounds} round(s)")
    progress(f"CPU placement: {describe_placement(config.placement)}")
    try:
        if "untar" in config.workloads:
            prepare_tarball(config, workdir)
            progress(f"tarball of {config.tar_source} holds {config.tar_entries} entries, "
                     f"{config.tar_bytes / MIB:.0f} MiB")
        for fs in filesystems:
            fs.create()

        for round_no in range(config.rounds):
            run_round(rotated(filesystems, round_no), round_no, config, results)
    finally:
        clean_up(filesystems, workdir)
    results.fuse_cpus = {fs.name: sorted(fs.seen_fuse_cpus) for fs in filesystems if fs.seen_fuse_cpus}
    return results


def describe_placement(placement: Placement) -> str:
    if placement.mode == "free":
        return "free (the scheduler places every process)"
    client = ",".join(map(str, sorted(placement.client_cpus)))
    fuse = ",".join(map(str, sorted(placement.fuse_cpus)))
    return f"{placement.mode} (benchmark, tar and fio on CPU {client}; FUSE processes on CPU {fuse})"


def run_round(order: list[Filesystem], round_no: int, config: Config, results: Results) -> None:
    progress(f"round {round_no + 1}/{config.rounds}: order {' '.join(fs.name for fs in order)}")
    for fs in order:
        fs.mount()

    for workload in config.workloads:
        if workload not in WORKLOADS:
            continue
        for fs in order:
            # Every filesystem starts from an empty page cache. On the test VM,
            # filling memory that the cache has not used for a while costs
            # about 8 us per page, so whichever filesystem ran later in the
            # round wrote much slower (docs/benchmarks.md, "Fresh memory").
            drop_page_cache()
            settle_disk(config.settle_timeout)
            values = WORKLOADS[workload](fs, config)
            fs.sample_memory()
            for metric, value in values.items():
                results.add(fs.name, metric, value)
                progress(f"round {round_no + 1} {metric:<10} {fs.name:<9} "
                         f"{format_value(value)} {METRIC_BY_NAME[metric].unit}")

    for fs in order:
        fs.unmount()
        peak_mib = fs.take_round_peak_rss_mib()
        if "memory" in config.workloads and peak_mib is not None:
            results.add(fs.name, "peak_rss", peak_mib)


def clean_up(filesystems: list[Filesystem], workdir: Path) -> None:
    """Unmount everything and remove the work directory, unless a mount refuses to go."""
    for fs in filesystems:
        try:
            fs.cleanup()
        except Exception as exc:  # keep cleaning the others
            progress(f"cleaning up {fs.name} failed: {exc}")

    still_mounted = [fs.root for fs in filesystems if is_mounted(fs.root)]
    if still_mounted:
        progress(f"left {workdir} in place because these are still mounted: "
                 f"{' '.join(map(str, still_mounted))}")
        return
    shutil.rmtree(workdir)


# --- report ----------------------------------------------------------------------------------------


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def ratio_to_plain(results: Results, filesystem: str, metric: str) -> float | None:
    value = results.median(filesystem, metric)
    plain = results.median("plain", metric)
    if value is None or not plain or metric == "peak_rss":
        return None
    return value / plain


def evaluate_targets(results: Results) -> list[dict]:
    verdicts = []
    for target in TARGETS:
        securevol = results.median("securevol", target.metric)
        references = {name: results.median(name, target.metric) for name in target.references}
        measured = {name: value for name, value in references.items() if value is not None}
        if securevol is None or not measured:
            continue
        best_name = max(measured, key=measured.get)
        needed = target.factor * measured[best_name]
        verdicts.append({
            "metric": target.metric,
            "securevol": securevol,
            "factor": target.factor,
            "reference": best_name,
            "reference_value": measured[best_name],
            "needed": needed,
            "met": securevol >= needed,
        })
    return verdicts


def render_table(results: Results, config: Config, verdicts: list[dict]) -> str:
    names = [name for name in config.filesystems if name in results.values]
    metrics = [m for m in METRICS if any(m.name in results.values[name] for name in names)]
    lines = [f"Medians over {config.rounds} round(s); (x) is the ratio to the plain directory.",
             f"CPU placement: {describe_placement(config.placement)}.", ""]

    header = f"{'metric':<11}{'unit':<10}" + "".join(f"{name:>20}" for name in names)
    lines += [header, "-" * len(header)]
    for metric in metrics:
        cells = []
        for name in names:
            value = format_value(results.median(name, metric.name))
            ratio = ratio_to_plain(results, name, metric.name)
            cells.append(f"{value} ({ratio:.2f}x)" if ratio is not None and name != "plain" else value)
        lines.append(f"{metric.name:<11}{metric.unit:<10}" + "".join(f"{cell:>20}" for cell in cells))

    if verdicts:
        lines += ["", "securevol targets:", ""]
        header = f"{'metric':<11}{'securevol':>12}  {'target':<28}{'needed':>12}  met"
        lines += [header, "-" * len(header)]
        for v in verdicts:
            target = f">= {v['factor']:g} x {v['reference']} ({format_value(v['reference_value'])})"
            lines.append(f"{v['metric']:<11}{format_value(v['securevol']):>12}  {target:<28}"
                         f"{format_value(v['needed']):>12}  {'yes' if v['met'] else 'NO'}")
    return "\n".join(lines)


def package_version(package: str) -> str | None:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return result.stdout.strip() or None


def securevol_revision() -> str | None:
    if "SECUREVOL_BENCH_REVISION" in os.environ:
        return os.environ["SECUREVOL_BENCH_REVISION"]
    result = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True)
    return result.stdout.strip() or None


def machine_facts() -> dict:
    with open("/proc/meminfo") as f:
        mem_total_kib = int(f.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "mem_total_mib": mem_total_kib // 1024,
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "load_average": os.getloadavg(),
    }


def _cpu_model() -> str | None:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def build_report(results: Results, config: Config, verdicts: list[dict], started: str, machine: dict) -> dict:
    names = [name for name in config.filesystems if name in results.values]
    return {
        "date": started,
        "command": " ".join(sys.argv),
        "machine": machine,
        "load_average_end": os.getloadavg(),
        "versions": {
            "securevol": securevol_revision(),
            "gocryptfs": package_version("gocryptfs"),
            "securefs": package_version("securefs"),
            "fio": package_version("fio"),
        },
        "config": {
            "size": config.size, "rounds": config.rounds, "files": config.files,
            "fio_size": config.fio_size, "fio_io_size": config.fio_io_size,
            "tar_source": str(config.tar_source), "tar_entries": config.tar_entries,
            "tar_bytes": config.tar_bytes,
            "workloads": list(config.workloads), "filesystems": list(config.filesystems),
            "placement": config.placement.describe(),
        },
        "fuse_cpus": results.fuse_cpus,
        "metrics": {m.name: {"unit": m.unit, "description": m.description} for m in METRICS},
        "rounds": {name: dict(results.values[name]) for name in names},
        "median": {name: {metric: results.median(name, metric) for metric in results.values[name]}
                   for name in names},
        "ratio_to_plain": {name: {metric: ratio_to_plain(results, name, metric)
                                  for metric in results.values[name]} for name in names},
        "targets": verdicts,
    }


# --- profile summary -------------------------------------------------------------------------------

_FRAME_LINE = re.compile(r":\d+\)$")


def summarize_profiles(profile_dir: Path, top: int = 12) -> str:
    """Sum py-spy's raw (collapsed) stacks per workload and list the functions with the most samples.

    py-spy leaves out idle samples, so the totals cover only the time the
    FUSE process was running Python code or a C call made from it, such as
    OpenSSL's AES-GCM. Inclusive time is listed for securevol's own
    functions, whose names tell which request and which step cost the time.
    """
    self_samples: dict[str, Counter] = defaultdict(Counter)
    total_samples: dict[str, Counter] = defaultdict(Counter)
    for path in sorted(profile_dir.glob("*.txt")):
        label = path.stem.split("-", 1)[1]
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [_FRAME_LINE.sub(")", frame) for frame in stack.split(";")]
            self_samples[label][frames[-1]] += int(count)
            for frame in set(frames):
                total_samples[label][frame] += int(count)

    lines = []
    for label, counter in self_samples.items():
        samples = sum(counter.values())
        lines.append(f"{label}: {samples} samples, {samples / PROFILE_RATE:.1f} s busy")
        lines.append("  self time:")
        for frame, count in counter.most_common(top):
            lines.append(f"    {100 * count / samples:5.1f}%  {frame}")
        lines.append("  inclusive time of securevol functions:")
        own = Counter({frame: count for frame, count in total_samples[label].items()
                       if "(securevol/" in frame and "(securevol/mount.py)" not in frame})
        for frame, count in own.most_common(top):
            lines.append(f"    {100 * count / samples:5.1f}%  {frame}")
        lines.append("")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use bytes or a K, M or G suffix, e.g. 256M")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]
    return int(match.group(1)) * scale


def parse_list(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"invalid choice {','.join(unknown) or text!r}; "
                                             f"pick from {','.join(choices)}")
        # Keep the canonical order: coldread reads the file seqwrite leaves behind.
        return tuple(item for item in choices if item in items)
    return parse


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--size", type=parse_size, help="size of the sequential file (default 1G, 32M with --quick)")
    parser.add_argument("--rounds", type=int,
                        help="rounds to run, each on every filesystem (default: one per filesystem, 1 with --quick)")
    parser.add_argument("--files", type=int, help="small files per round (default 10000, 500 with --quick)")
    parser.add_argument("--fio-size", type=parse_size,
                        help="size of fio's file; each job reads or writes a quarter of it (default 256M, 16M with --quick)")
    parser.add_argument("--tar-source", type=Path,
                        help="directory to tar up for the untar workload (default: /usr/include, "
                             "/usr/include/linux with --quick)")
    parser.add_argument("--workloads", type=parse_list(ALL_WORKLOADS), default=ALL_WORKLOADS,
                        help=f"comma-separated workloads (default: {','.join(ALL_WORKLOADS)})")
    parser.add_argument("--filesystems", type=parse_list(ALL_FILESYSTEMS), default=ALL_FILESYSTEMS,
                        help=f"comma-separated filesystems (default: {','.join(ALL_FILESYSTEMS)})")
    parser.add_argument("--quick", action="store_true", help="small sizes and one round, for a smoke run")
    parser.add_argument("--settle-timeout", type=float, default=SETTLE_TIMEOUT_SECONDS, metavar="SECONDS",
                        help="maximum wait, in seconds, for the disks to be quiet before each timed step "
                             f"(default {SETTLE_TIMEOUT_SECONDS:.0f}; 0 skips the wait, for a smoke run "
                             "on a machine whose disks other work keeps busy)")
    parser.add_argument("--placement", choices=PLACEMENTS, default="free",
                        help="free (default) leaves every process to the scheduler, together runs the "
                             "benchmark and every FUSE process on one CPU, apart runs the FUSE processes "
                             "on another CPU than the benchmark")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results as JSON to PATH; '-' writes JSON to stdout and the table to stderr")
    parser.add_argument("--workdir", type=Path,
                        help="parent of the temporary work directory (default: $TMPDIR or /tmp); "
                             "its filesystem holds the plain directory and every backing store")
    parser.add_argument("--revision", metavar="REV",
                        help="benchmark securevol as committed at REV (e.g. HEAD) instead of the work tree")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample securevol's FUSE process with py-spy during each timed step and write "
                             "the stacks and a summary to DIR; the figures of such a run are not comparable")
    args = parser.parse_args(argv)

    quick = args.quick
    # C headers: many small files from Debian's -dev packages, which scripts/setup.sh installs.
    tar_source = args.tar_source or Path("/usr/include/linux" if quick else "/usr/include")
    fio_size = args.fio_size or (16 * MIB if quick else 256 * MIB)
    config = Config(
        size=args.size or (32 * MIB if quick else 1 << 30),
        rounds=args.rounds or (1 if quick else len(args.filesystems)),
        files=args.files or (500 if quick else 10_000),
        fio_size=fio_size,
        fio_io_size=max(FIO_BLOCK, fio_size // 4 // FIO_BLOCK * FIO_BLOCK),
        tar_source=tar_source,
        workloads=args.workloads,
        filesystems=args.filesystems,
        workdir_parent=args.workdir,
        profile_dir=args.profile,
        settle_timeout=args.settle_timeout,
    )
    try:
        config.placement = Placement.choose(args.placement, os.sched_getaffinity(0))
    except ValueError as exc:
        parser.error(str(exc))
    check_config(parser, config)
    return config, args


def check_config(parser: argparse.ArgumentParser, config: Config) -> None:
    if config.rounds < 1 or config.files < 1 or config.size < 1 or config.fio_size < FIO_BLOCK:
        parser.error("--rounds, --files and --size must be positive and --fio-size at least 4K")
    if not config.settle_timeout >= 0:
        parser.error(f"--settle-timeout must be 0 or more seconds, not {config.settle_timeout}")
    if "untar" in config.workloads and not config.tar_source.is_dir():
        parser.error(f"--tar-source {config.tar_source} is not a directory")
    for tool in ("fusermount3", "fio", "gocryptfs", "securefs", "tar"):
        needed = {"fio": "random4k" in config.workloads, "gocryptfs": "gocryptfs" in config.filesystems,
                  "securefs": "securefs" in config.filesystems}.get(tool, True)
        if needed and shutil.which(tool) is None:
            parser.error(f"{tool} is not installed; run scripts/setup.sh")
    if os.geteuid() != 0:
        parser.error("run as root: the benchmark mounts FUSE filesystems and drops the page cache")


def run_revision(revision: str, argv: list[str]) -> int:
    """Run this script again with securevol's package taken from *revision* of the repository.

    The FUSE processes inherit PYTHONPATH from the benchmark (securevol.mounter
    passes it on), so they run that revision too, whatever the work tree contains.
    """
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{revision}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        sys.exit(f"bench: revision {revision!r} not found in {REPO}")
    commit_id = commit.stdout.strip()

    source = Path(tempfile.mkdtemp(prefix="securevol-bench-source-"))
    try:
        archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit_id, "plugin"], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(source)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            sys.exit(f"bench: git archive of {commit_id} failed")

        env = dict(os.environ, PYTHONPATH=str(source / "plugin"), SECUREVOL_BENCH_REVISION=commit_id)
        child = subprocess.Popen([sys.executable, __file__, *argv], env=env)
        try:
            return child.wait()
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait()
    finally:
        shutil.rmtree(source)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config, args = parse_args(argv)

    # SIGTERM unwinds like Ctrl-C, so every mount and the work directory are
    # cleaned up, and with --revision the child run is stopped first.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.revision and "SECUREVOL_BENCH_REVISION" not in os.environ:
        return run_revision(args.revision, argv)
    if config.profile_dir is not None:
        config.profile_dir.mkdir(parents=True, exist_ok=True)

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = machine_facts()
    results = run_benchmark(config)
    verdicts = evaluate_targets(results)
    table = render_table(results, config, verdicts)

    if args.json == "-":
        print(table, file=sys.stderr)
        json.dump(build_report(results, config, verdicts, started, machine), sys.stdout, indent=2)
        print()
    else:
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(build_report(results, config, verdicts, started, machine),
                                                  indent=2) + "\n")

    if config.profile_dir is not None:
        summary = summarize_profiles(config.profile_dir)
        (config.profile_dir / "summary.txt").write_text(summary)
        progress(f"profile summary written to {config.profile_dir / 'summary.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
