"""Smoke test of scripts/bench.py: a tiny run reports every metric for every filesystem and cleans up.

It checks what the report contains and that nothing is left mounted, never
how fast anything was.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPEED_METRICS = ("seq_write", "cold_read", "create", "stat", "delete", "rand_read", "rand_write", "untar")
FUSE_FILESYSTEMS = ("securevol", "gocryptfs", "securefs")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the benchmark mounts FUSE filesystems, which needs root")
        pytest.skip("the benchmark mounts FUSE filesystems, which needs root")

    workdir = tmp_path_factory.mktemp("bench")
    # No wait for quiet disks: it only steadies the figures, which are not
    # checked here. A quick run of four filesystems waits 36 times, and while
    # other work kept the disks busy, many waits took their full 30 s and the
    # run took longer than the 600 s below.
    command = [
        sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--json", "-",
        "--size", "4M", "--files", "50", "--fio-size", "1M", "--workdir", str(workdir),
        "--settle-timeout", "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), workdir, result.stderr


@pytest.mark.slow
def test_quick_run_reports_every_metric(quick_report: tuple[dict, Path, str]) -> None:
    report, _, _ = quick_report
    for filesystem in ("plain", *FUSE_FILESYSTEMS):
        medians = report["median"][filesystem]
        for metric in SPEED_METRICS:
            assert medians.get(metric, 0) > 0, f"{metric} missing for {filesystem}"
            assert len(report["rounds"][filesystem][metric]) == 1


@pytest.mark.slow
def test_quick_run_reports_fuse_memory(quick_report: tuple[dict, Path, str]) -> None:
    report, _, _ = quick_report
    for filesystem in FUSE_FILESYSTEMS:
        assert report["median"][filesystem]["peak_rss"] > 0, filesystem
    assert "peak_rss" not in report["median"]["plain"]


@pytest.mark.slow
def test_quick_run_judges_every_target(quick_report: tuple[dict, Path, str]) -> None:
    report, _, _ = quick_report
    judged = {verdict["metric"]: verdict for verdict in report["targets"]}
    assert sorted(judged) == sorted(SPEED_METRICS)
    for verdict in judged.values():
        assert verdict["met"] == (verdict["securevol"] >= verdict["needed"])


@pytest.mark.slow
def test_quick_run_leaves_nothing_behind(quick_report: tuple[dict, Path, str]) -> None:
    _, workdir, _ = quick_report
    assert list(workdir.iterdir()) == []
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if str(workdir) in line]


@pytest.mark.slow
def test_quick_run_states_its_sizes(quick_report: tuple[dict, Path, str]) -> None:
    _, _, progress = quick_report
    assert "sizes: sequential file 4 MiB, 50 small files, fio file 1 MiB (256 KiB per job), 1 round(s)" in progress


def run_pinned(workdir: Path, placement: str) -> dict:
    command = [
        sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--json", "-",
        "--workloads", "smallfiles", "--filesystems", "plain,securevol,gocryptfs", "--files", "20",
        "--workdir", str(workdir), "--settle-timeout", "0", "--placement", placement,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["together", "apart"])
def test_placement_pins_fuse_processes(placement: str, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the benchmark mounts FUSE filesystems, which needs root")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")

    report = run_pinned(tmp_path, placement)

    chosen = report["config"]["placement"]
    assert chosen["mode"] == placement
    assert len(chosen["client_cpus"]) == 1
    assert len(chosen["fuse_cpus"]) == 1
    assert (chosen["client_cpus"] == chosen["fuse_cpus"]) == (placement == "together")
    # Read back from every thread of each FUSE process while it served.
    assert report["fuse_cpus"] == {"securevol": chosen["fuse_cpus"], "gocryptfs": chosen["fuse_cpus"]}
    assert report["median"]["securevol"]["stat"] > 0


@pytest.mark.slow
def test_free_placement_leaves_fuse_processes_unpinned(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the benchmark mounts FUSE filesystems, which needs root")

    report = run_pinned(tmp_path, "free")

    assert report["config"]["placement"] == {"mode": "free", "client_cpus": None, "fuse_cpus": None}
    everywhere = sorted(os.sched_getaffinity(0))
    assert report["fuse_cpus"] == {"securevol": everywhere, "gocryptfs": everywhere}


def test_apart_placement_needs_two_cpus() -> None:
    command = ["taskset", "-c", str(min(os.sched_getaffinity(0))), sys.executable,
               str(REPO / "scripts" / "bench.py"), "--placement", "apart", "--filesystems", "plain"]

    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)

    assert result.returncode == 2
    assert "--placement apart needs at least two CPUs" in result.stderr


def _fio_processes(workdir: Path) -> list[int]:
    """Return the PIDs of fio processes whose arguments name a file under *workdir*."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # the process ended while we listed them
        if argv[0] == b"fio" and any(os.fsencode(workdir) in arg for arg in argv):
            found.append(int(name))
    return found


def test_interrupt_during_fio_leaves_no_fio(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the benchmark drops the page cache, which needs root")
    command = [
        sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--filesystems", "plain",
        "--workloads", "random4k", "--fio-size", "64M", "--settle-timeout", "0", "--workdir", str(tmp_path),
    ]
    bench = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _fio_processes(tmp_path):
            assert bench.poll() is None, "the benchmark ended before fio started"
            assert time.monotonic() < deadline, "fio did not start within 60 s"
            time.sleep(0.005)

        bench.send_signal(signal.SIGINT)  # to the benchmark alone, not to its process group
        bench.wait(timeout=60)

        deadline = time.monotonic() + 5
        while _fio_processes(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _fio_processes(tmp_path)
        assert left == []
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for pid in _fio_processes(tmp_path):
            os.kill(pid, signal.SIGKILL)
