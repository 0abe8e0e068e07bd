"""The durable pool: records survive a kill at any moment, a half-written one is dropped with a
warning, corruption elsewhere is an error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from bpo.pool import PreferencePair, PreferencePool, append_records, read_records


def pair(i: int) -> PreferencePair:
    return PreferencePair(f"x{i}", "a", "b", [1], [2, i], [3], -1.0, -2.0, 0, float(i))


def test_half_written_last_record_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "pool.jsonl"
    PreferencePool(path).add([pair(0), pair(1)])
    with open(path, "a") as f:
        f.write('{"prompt": "x2", "cho')  # a crash in the middle of a write
    with pytest.warns(UserWarning, match="dropped a half-written last record"):
        assert [p.margin for p in PreferencePool.read(path)] == [0.0, 1.0]
    assert path.read_text().endswith('"cho')  # a reader leaves the file alone
    with pytest.warns(UserWarning):
        read_records(path, repair=True)  # its owner cuts the half record off
    append_records(path, [{"n": 3}])
    assert read_records(path)[-1] == {"n": 3}


def test_a_bad_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text('{"n": 1}\nnot json\n{"n": 2}\n')
    with pytest.raises(ValueError, match=r"pool.jsonl: line 2 is not a JSON record"):
        read_records(path)


WRITER = """
import sys
from bpo.pool import PreferencePair, PreferencePool
pool = PreferencePool(sys.argv[1])
for i in range(100000):
    pool.add([PreferencePair(f"x{i}-{j}", "a" * 200, "b", [1], [2], [3], -1.0, -2.0, 0, float(i))
              for j in range(3)])
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_kill_9_while_writing_loses_no_complete_record(tmp_path, delay):
    """A writer appending batches of 3 is killed with SIGKILL; what is on disk is whole batches
    in order, then at most one half record, which is dropped."""
    path = tmp_path / "pool.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    while not path.exists():  # importing takes a while; kill it while it writes
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = PreferencePool.read(path)
    assert len(caught) == (0 if path.read_bytes().endswith(b"\n") else 1)
    names = [p.prompt for p in pairs]
    assert len(names) == len(set(names))  # no duplicates
    expected = [f"x{i}-{j}" for i in range(len(names) // 3 + 1) for j in range(3)]
    assert names == expected[: len(names)]  # in order, nothing skipped
