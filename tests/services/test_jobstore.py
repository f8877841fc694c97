"""The service's job store (services/jobstore.py): atomic records, restart recovery, one owner per results folder."""

from __future__ import annotations

import subprocess
import sys

from cupscale_dist.services.jobstore import JobStore


def test_job_store_records_are_atomic_and_a_restart_fails_unfinished_jobs(tmp_path):
    store = JobStore(tmp_path)
    done = store.create(b"png", {"knobs": {}})
    store.update(done["id"], status="succeeded")
    store.result_path(done["id"]).write_bytes(b"result")
    running = store.create(b"png", {"knobs": {}})
    store.update(running["id"], status="running")
    queued = store.create(b"png", {"knobs": {}})
    (tmp_path / "inputs" / ("f" * 32)).write_bytes(b"orphan upload")  # a record was never written for it
    assert not list((tmp_path / "jobs").glob(".*"))  # no temp files left behind
    again = JobStore(tmp_path)  # the replica restarted
    assert sorted(again.recover()) == sorted([running["id"], queued["id"]])
    for job in (running, queued):
        record = again.get(job["id"])
        assert record["status"] == "failed" and "interrupted" in record["error"]
        assert not again.input_path(job["id"]).exists()
    assert again.get(done["id"])["status"] == "succeeded" and again.result_path(done["id"]).read_bytes() == b"result"
    assert not (tmp_path / "inputs" / ("f" * 32)).exists()
    again.update(done["id"], status="failed")  # a final status is never left
    assert again.get(done["id"])["status"] == "succeeded"
    assert again.get("../../etc/passwd") is None and again.get("0" * 32) is None


def test_one_service_per_results_folder(tmp_path):
    first = JobStore(tmp_path)
    first.claim()
    script = ("import sys; from cupscale_dist.services.jobstore import JobStore\n"
              "try: JobStore(sys.argv[1]).claim()\nexcept Exception as e: print(e); sys.exit(3)")
    other = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode == 3 and "in use by another service" in other.stdout
    first.release()
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path)]).returncode == 0
