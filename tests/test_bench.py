"""Smoke test of scripts/bench.py: a tiny run reports every metric for every filesystem and cleans up.

It checks what the report contains and that nothing is left mounted, never
how fast anything was.
"""

import json
import os
import subprocess
import sys
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
