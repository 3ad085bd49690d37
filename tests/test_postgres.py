"""Scale-out on PostgreSQL: two listeners and three workers on one database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pydicom
import pytest
from support.dicom import send_datasets
from support.paths import REPO
from support.peers import StoreSCP
from support.pg import postgres  # noqa: F401  (fixture)

from mammonode.demo.loopback import free_port
from mammonode.demo.phantom import exam_datasets
from mammonode.pipeline.weights_admin import generate_test_weights as generate

pytestmark = [pytest.mark.postgres, pytest.mark.network]
STUDIES = 20


def test_two_listeners_three_workers_each_study_once(postgres, node_factory, tmp_path):  # noqa: F811
    weights = generate(tmp_path / "weights", models=("density_histogram",))
    storage = tmp_path / "shared-storage"
    scp_port = free_port()
    common = dict(
        weights_dir=weights,
        storage=storage,
        database_url=postgres.url,
        pipeline={"models": ["density_histogram"]},
        worker={"enabled": False, "stale_after_s": 6.0, "heartbeat_interval_s": 1.0},
        study={"quiet_period_s": 2.0},
        destinations=[{"name": "archive", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp_port}],
    )
    listeners = [node_factory(**common).start(), node_factory(**common).start()]
    scp = StoreSCP(tmp_path / "scp", scp_port).start()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mammonode.cli",
                "worker",
                "--config",
                str(listeners[i % 2].config),
                "--device",
                "cpu",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(3)
    ]
    try:
        exams = [exam_datasets(patient_id=f"SCALE{i:03d}", shape=(600, 480)) for i in range(STUDIES)]

        def split(exam):
            # Half of each study's views to each listener, at the same time.
            results = {}
            threads = [
                threading.Thread(
                    target=lambda k=k, part=part: results.__setitem__(k, send_datasets(listeners[k].port, part))
                )
                for k, part in ((0, exam[:2]), (1, exam[2:]))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert results[0] == [0, 0] and results[1] == [0, 0]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=4) as pool:  # 8 associations at a time, under the limit
            list(pool.map(split, exams))

        # Kill one worker while it runs a job.
        killed = None
        deadline = time.monotonic() + 120
        with psycopg.connect(postgres.url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
            while killed is None and time.monotonic() < deadline:
                for (worker_id,) in conn.execute("select worker_id from jobs where state = 'running'"):
                    pid = int(worker_id.split(":")[1])
                    victim = next((w for w in workers if w.pid == pid), None)
                    if victim is not None:
                        os.kill(pid, signal.SIGKILL)
                        victim.wait()
                        killed = worker_id
                        break
                time.sleep(0.05)
        assert killed is not None, "no job was seen running"

        uids = [str(e[0].StudyInstanceUID) for e in exams]

        def finished():
            with psycopg.connect(postgres.url.replace("postgresql+psycopg", "postgresql")) as conn:
                done = conn.execute("select count(*) from studies where state = 'done'").fetchone()[0]
                waiting = conn.execute("select count(*) from deliveries where state <> 'delivered'").fetchone()[0]
                total = conn.execute("select count(*) from deliveries").fetchone()[0]
            return done == STUDIES and total > 0 and waiting == 0

        listeners[0].wait_for(finished, 300, interval=1, what="all studies processed and delivered")
        with psycopg.connect(postgres.url.replace("postgresql+psycopg", "postgresql")) as conn:
            per_study = dict(
                conn.execute(
                    "select s.study_instance_uid, count(*) from jobs j join studies s on s.id = j.study_id "
                    "where j.state = 'done' group by s.study_instance_uid"
                ).fetchall()
            )
            views = conn.execute("select count(*) from instances where usable").fetchone()[0]
            retried = conn.execute("select count(*) from jobs where attempts > 1").fetchone()[0]
            # Every object routed to the destination (the CAD SR of test weights is kept, not sent).
            results = [
                r[0]
                for r in conn.execute(
                    "select sop_instance_uid from result_objects r "
                    "where exists (select 1 from deliveries d where d.result_id = r.id)"
                )
            ]
        assert views == 4 * STUDIES, "a view was lost"
        assert sorted(per_study) == sorted(uids) and set(per_study.values()) == {1}
        assert retried >= 1, "the killed worker's job was not re-run"
        time.sleep(3)
        received = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in scp.files()]
        assert sorted(received) == sorted(results), "every result exactly once"
        assert len(results) == 6 * STUDIES
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
                w.wait(30)
        scp.stop()
