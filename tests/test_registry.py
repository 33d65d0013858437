"""Tests of the on-disk registry: records, mount counts, locking across processes."""

import json
import multiprocessing
import os
import stat
import threading
import time

import pytest

from securevol.errors import InvalidVolumeName, SecurevolError, VolumeNotFound
from securevol.registry import MountState, Registry, VolumeRecord, now_rfc3339
from securevol.syscalls import replace_file, temporary_files_of

FORK = multiprocessing.get_context("fork")


def _record(name="db", **options):
    return VolumeRecord(
        name=name,
        volume_id="00" * 16,
        created_at=now_rfc3339(),
        options=dict(options),
        key_provider="local",
    )


def _registry(tmp_path):
    registry = Registry(tmp_path)
    registry.ensure_layout()
    return registry


def _create(registry, name="db", attributes=(0, 0, 0o755), **options):
    with registry.creating_or_removing():
        registry.create(_record(name, **options), {"provider": "local", "x": 1}, attributes)


def test_create_and_read_back(tmp_path):
    registry = _registry(tmp_path)

    _create(registry, "db", mode="0750")

    assert registry.exists("db")
    assert registry.read_volume("db") == registry.list_volumes()[0]
    assert registry.read_volume("db").options == {"mode": "0750"}
    assert registry.read_wrapped_dek("db") == {"provider": "local", "x": 1}
    assert registry.read_mounts("db") == MountState()


def test_files_and_directories_private(tmp_path):
    registry = _registry(tmp_path)
    _create(registry, "db")

    volume_dir = registry.volume_dir("db")
    assert stat.S_IMODE(registry.volumes_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(volume_dir.stat().st_mode) == 0o700
    for name in ("volume.json", "dek.json", "mounts.json"):
        assert stat.S_IMODE((volume_dir / name).stat().st_mode) == 0o600, name
    assert sorted(p.name for p in volume_dir.iterdir()) == ["data", "dek.json", "mounts.json", "volume.json"]


def test_data_dir_gets_root_attributes(tmp_path):
    registry = _registry(tmp_path)

    _create(registry, "db", attributes=(1234, 5678, 0o2770))

    st = registry.data_dir("db").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o2770)


def test_unknown_volume_not_found(tmp_path):
    registry = _registry(tmp_path)

    with pytest.raises(VolumeNotFound, match="'nope' does not exist"):
        registry.read_volume("nope")
    with pytest.raises(VolumeNotFound), registry.changing_mounts("nope"):
        pass
    assert not registry.exists("nope")


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\0b", "x" * 300])
def test_hostile_names_never_reach_the_filesystem(tmp_path, name):
    registry = _registry(tmp_path)

    with pytest.raises(InvalidVolumeName):
        registry.volume_dir(name)


def test_list_sorted_and_skips_incomplete(tmp_path):
    registry = _registry(tmp_path)
    for name in ("b", "a", "c"):
        _create(registry, name)
    (registry.volumes_dir / "half-created").mkdir()

    assert [record.name for record in registry.list_volumes()] == ["a", "b", "c"]


def test_list_skips_damaged_record(tmp_path, caplog):
    registry = _registry(tmp_path)
    _create(registry, "good")
    _create(registry, "bad")
    (registry.volume_dir("bad") / "volume.json").write_text("{not json")

    assert [record.name for record in registry.list_volumes()] == ["good"]
    assert "volume record unreadable vol=bad" in caplog.text
    with pytest.raises(SecurevolError, match="cannot be read"):
        registry.read_volume("bad")


def test_record_missing_field_reported_as_damaged(tmp_path):
    registry = _registry(tmp_path)
    _create(registry, "db")
    path = registry.volume_dir("db") / "volume.json"
    data = json.loads(path.read_text())
    del data["volume_id"]
    path.write_text(json.dumps(data))

    with pytest.raises(SecurevolError, match="volume.json of volume 'db' is damaged"):
        registry.read_volume("db")


def test_create_replaces_incomplete_volume(tmp_path):
    registry = _registry(tmp_path)
    leftover = registry.volumes_dir / "db" / "data"
    leftover.mkdir(parents=True)
    (leftover / "old").write_bytes(b"x")

    _create(registry, "db")

    assert list(registry.data_dir("db").iterdir()) == []


def test_remove_incomplete_keeps_only_readable_data(tmp_path, caplog):
    registry = _registry(tmp_path)
    _create(registry, "complete")
    (registry.data_dir("complete") / "cipher").write_bytes(b"c" * 100)
    for name in ("create-cut", "remove-cut", "record-lost"):
        _create(registry, name)
        (registry.volume_dir(name) / "volume.json").unlink()
    (registry.data_dir("remove-cut") / "cipher").write_bytes(b"c" * 100)
    (registry.volume_dir("remove-cut") / "dek.json").unlink()
    (registry.data_dir("record-lost") / "cipher").write_bytes(b"c" * 100)

    with caplog.at_level("WARNING", logger="securevol.registry"):
        registry.remove_incomplete()

    assert registry.volume_names() == ["complete", "record-lost"]
    assert (registry.data_dir("complete") / "cipher").exists()
    assert (registry.volume_dir("record-lost") / "dek.json").exists()
    messages = [record.getMessage() for record in caplog.records]
    assert "incomplete volume removed vol=create-cut" in messages
    assert "incomplete volume removed vol=remove-cut" in messages
    assert any(message.startswith("volume record missing, directory kept vol=record-lost") for message in messages)


def test_destroy_wrapped_dek_then_remove(tmp_path):
    registry = _registry(tmp_path)
    _create(registry, "db")
    (registry.data_dir("db") / "cipher").write_bytes(b"c" * 100)

    registry.destroy_wrapped_dek("db")

    assert not (registry.volume_dir("db") / "dek.json").exists()
    assert (registry.data_dir("db") / "cipher").exists()
    # A Remove cut short here leaves the record, and the message names the command that finishes it.
    with pytest.raises(SecurevolError, match="no wrapped key.*run 'docker volume rm db' again"):
        registry.read_wrapped_dek("db")

    registry.remove("db")

    assert not registry.volume_dir("db").exists()
    assert not registry.exists("db")


def test_mount_state_is_a_multiset():
    state = MountState()

    state.add("id1")
    state.add("id1")
    state.add("id2")

    assert state.total == 3
    assert state.discard("id1")
    assert state.counts == {"id1": 1, "id2": 1}
    assert state.discard("id1")
    assert not state.discard("id1")
    assert state.counts == {"id2": 1}


def test_mount_state_round_trip(tmp_path):
    registry = _registry(tmp_path)
    _create(registry, "db")
    state = MountState(counts={"a": 2, "b": 1}, pid=4242, mountpoint="/mnt/db")

    with registry.changing_mounts("db"):
        registry.write_mounts("db", state)

    assert registry.read_mounts("db") == state


def _bump_mounts(state_dir, name, worker, rounds):
    registry = Registry(state_dir)
    for i in range(rounds):
        with registry.changing_mounts(name):
            state = registry.read_mounts(name)
            state.add(f"worker-{worker}")
            state.add("shared")
            if i % 2:
                state.discard("shared")
            registry.write_mounts(name, state)


def test_concurrent_mount_updates_from_processes(tmp_path):
    registry = _registry(tmp_path)
    _create(registry, "db")
    _create(registry, "web")
    workers, rounds = 6, 40

    processes = [
        FORK.Process(target=_bump_mounts, args=(tmp_path, name, worker, rounds))
        for worker in range(workers)
        for name in ("db", "web")
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)

    assert [process.exitcode for process in processes] == [0] * len(processes)
    for name in ("db", "web"):
        counts = registry.read_mounts(name).counts
        assert counts.pop("shared") == workers * rounds // 2
        assert counts == {f"worker-{worker}": rounds for worker in range(workers)}


def _hold_exclusive(state_dir, started, journal):
    registry = Registry(state_dir)
    with registry.creating_or_removing():
        _append(journal, "remove-start")
        started.set()
        time.sleep(0.3)  # widen the window in which a missing lock would show
        _append(journal, "remove-end")


def _change_mounts(state_dir, started, journal):
    started.wait(30)
    with Registry(state_dir).changing_mounts("db"):
        _append(journal, "mount")


def _append(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def test_mount_change_waits_for_create_or_remove(tmp_path):
    registry = _registry(tmp_path)
    _create(registry, "db")
    journal = tmp_path / "journal"
    started = FORK.Event()

    holder = FORK.Process(target=_hold_exclusive, args=(tmp_path, started, journal))
    waiter = FORK.Process(target=_change_mounts, args=(tmp_path, started, journal))
    holder.start()
    waiter.start()
    holder.join(30)
    waiter.join(30)

    assert (holder.exitcode, waiter.exitcode) == (0, 0)
    assert journal.read_text().split() == ["remove-start", "remove-end", "mount"]


RELAY_ROUNDS = 200
RELAY_WAIT_SECONDS = 2.0


def _mount_relay(state_dir, name, first, barrier, relaying, journal):
    """Change the mounts of *name* in turns with another relay, so that one of them always holds the lock.

    In each round one relay lets go of the registry lock and takes it again while the other
    holds it (the barrier orders the turns). A relay that cannot take the lock again breaks
    the barrier after RELAY_WAIT_SECONDS, and both stop early; "relay-end" marks a relay that
    ran every round.
    """
    registry = Registry(state_dir)
    lock = registry.changing_mounts(name)
    lock.__enter__()
    try:
        barrier.wait(RELAY_WAIT_SECONDS)
        relaying.set()
        for turn in range(2 * RELAY_ROUNDS):
            if (turn % 2 == 0) == first:
                lock.__exit__(None, None, None)
                lock = registry.changing_mounts(name)
                lock.__enter__()
            barrier.wait(RELAY_WAIT_SECONDS)
    except threading.BrokenBarrierError:
        return
    finally:
        lock.__exit__(None, None, None)
    _append(journal, "relay-end")


def test_create_not_starved_by_overlapping_mounts(tmp_path):
    registry = _registry(tmp_path)
    for name in ("a", "b"):
        _create(registry, name)
    journal = tmp_path / "journal"
    journal.touch()
    barrier = FORK.Barrier(2)
    relaying = FORK.Event()
    relays = [FORK.Process(target=_mount_relay, args=(tmp_path, name, name == "a", barrier, relaying, journal))
              for name in ("a", "b")]
    for relay in relays:
        relay.start()
    try:
        assert relaying.wait(30)

        # flock(2) alone keeps granting the relays' shared locks while this Create waits for an
        # exclusive one, so it would get in only after both relays had run every round.
        _create(registry, "new")
        _append(journal, "created")
    finally:
        for relay in relays:
            relay.join(120)

    assert [relay.exitcode for relay in relays] == [0, 0]
    assert journal.read_text().split() == ["created"]
    assert registry.read_volume("new").name == "new"


def _rewrite_mounts(state_dir, rounds):
    registry = Registry(state_dir)
    for i in range(rounds):
        with registry.changing_mounts("db"):
            registry.write_mounts("db", MountState(counts={f"id{j}": 1 for j in range(i % 50)}))


def test_readers_never_see_partial_files(tmp_path):
    registry = _registry(tmp_path)
    _create(registry, "db")
    writer = FORK.Process(target=_rewrite_mounts, args=(tmp_path, 300))

    writer.start()
    reads = 0
    while writer.is_alive() or reads == 0:
        registry.read_mounts("db")  # raises on a torn file
        reads += 1
    writer.join()

    assert writer.exitcode == 0
    assert not [p for p in registry.volume_dir("db").iterdir() if p.name.endswith(".tmp")]
    assert os.path.exists(registry.volume_dir("db") / "volume.lock")


def test_replace_file_leaves_no_temporary_file_on_failure(tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "entry").write_text("x")

    with pytest.raises(OSError):
        replace_file(target, b"data")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["occupied"]
    assert temporary_files_of(target) == []


def test_replace_file_writes_mode_0600(tmp_path):
    target = tmp_path / "record"

    replace_file(target, b"data")

    assert target.read_bytes() == b"data"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
