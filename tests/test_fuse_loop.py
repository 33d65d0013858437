"""Tests of fuse_loop's wait between requests, on a pipe standing in for the FUSE device.

test_fs_mount.py runs the loop itself on real mounts, including a stop by
SIGTERM while clients keep it busy.
"""

import os

import pytest
import trio

from securevol import fuse_loop


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)


def test_queued_requests_yield_after_streak(pipe):
    read_fd, write_fd = pipe
    os.write(write_fd, b"request")  # stays readable for the whole test
    wait = fuse_loop._QueuedRequestWait(read_fd)
    other_task_ran_after: list[int] = []

    async def other_task() -> None:
        other_task_ran_after.append(calls)

    async def main() -> None:
        nonlocal calls
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            while not other_task_ran_after:
                assert await wait() is True
                calls += 1

    calls = 0
    trio.run(main)

    # The first FAST_STREAK waits return without a checkpoint, so the other
    # task cannot run before them. Trio shuffles runnable tasks, so it runs at
    # the next slow wait or, at the latest, one streak later.
    assert len(other_task_ran_after) == 1
    assert fuse_loop.FAST_STREAK <= other_task_ran_after[0] <= 2 * fuse_loop.FAST_STREAK + 1


def test_wait_ends_on_notify_closing(pipe):
    read_fd, _ = pipe
    wait = fuse_loop._QueuedRequestWait(read_fd)
    results = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                with trio.fail_after(10):
                    results.append(await wait())

            nursery.start_soon(waiter)
            await trio.sleep(3 * fuse_loop.FAST_WAIT_MS / 1000)
            assert results == []
            # What pyfuse3.terminate() does to end the loop.
            trio.lowlevel.notify_closing(read_fd)

    trio.run(main)
    assert results == [False]


def test_wait_returns_on_late_request(pipe):
    read_fd, write_fd = pipe
    wait = fuse_loop._QueuedRequestWait(read_fd)

    async def main() -> bool:
        async with trio.open_nursery() as nursery:

            async def send_later() -> None:
                await trio.sleep(0.05)
                os.write(write_fd, b"request")

            nursery.start_soon(send_later)
            with trio.fail_after(10):
                return await wait()

    assert trio.run(main) is True
