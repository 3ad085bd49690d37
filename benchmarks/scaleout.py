#!/usr/bin/env python
"""Jobs per minute with 1, 2 and 3 workers on one PostgreSQL database (this machine, CPU).

A reduced pipeline (density histogram + image-only classifier, single pass, one CPU thread
per worker, seeded test weights) on synthetic 1300x1000 phantom exams, so that the curve
shows the queue and the workers rather than one model's speed. For each worker count a
fresh database and listener; all studies are queued first, then the workers are started
and timed until every study is done.

    .venv/bin/python benchmarks/scaleout.py [--studies 12] [--workers 1,2,3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, free_port, wait_port

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def run(workers: int, studies: int, tmp: Path) -> float:
    import psycopg
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from support.pg import PostgresServer

    from mammonode.demo.phantom import exam_datasets
    from mammonode.pipeline.weights_admin import generate_test_weights as generate

    server = PostgresServer().start()
    try:
        weights = generate(tmp / "weights", models=("density_histogram", "image_only"))
        port, web = free_port(), free_port()
        config = tmp / "config.toml"
        config.write_text(f"""[node]
host = "127.0.0.1"
port = {port}
[dicomweb]
host = "127.0.0.1"
port = {web}
[storage]
directory = "{tmp / "storage"}"
[database]
url = "{server.url}"
[study]
quiet_period_s = 0.5
[pipeline]
weights_dir = "{weights}"
models = ["density_histogram", "image_only"]
augmentation = false
threads = 1
[worker]
enabled = false
poll_interval_s = 0.2
[logging]
level = "WARNING"
""")
        node = subprocess.Popen([sys.executable, "-m", "mammonode.cli", "serve", "--config", str(config)], cwd=REPO)
        wait_port(port)
        ae = AE(ae_title="SCALEBENCH")
        exams = [exam_datasets(patient_id=f"B{i}", shape=(1300, 1000)) for i in range(studies)]
        ae.add_requested_context(exams[0][0].SOPClassUID, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
        for exam in exams:
            for ds in exam:
                assoc.send_c_store(ds)
        assoc.release()
        dsn = server.url.replace("postgresql+psycopg", "postgresql")

        def count(state: str) -> int:
            with psycopg.connect(dsn) as conn:
                return conn.execute("select count(*) from studies where state = %s", (state,)).fetchone()[0]

        while count("queued") < studies:
            time.sleep(0.2)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "mammonode.cli", "worker", "--config", str(config), "--device", "cpu"], cwd=REPO
            )
            for _ in range(workers)
        ]
        start = time.perf_counter()
        while count("done") < studies:
            time.sleep(0.2)
        elapsed = time.perf_counter() - start
        for p in procs + [node]:
            p.terminate()
            p.wait()
        return studies / elapsed * 60
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--workers", default="1,2,3")
    args = parser.parse_args()
    rates = {}
    for count in (int(x) for x in args.workers.split(",")):
        with tempfile.TemporaryDirectory(prefix="mammonode-scale-") as tmp:
            rates[count] = run(count, args.studies, Path(tmp))
        print(f"{count} worker(s): {rates[count]:.1f} jobs/minute ({args.studies} studies)", flush=True)
    base = rates[min(rates)]
    print("scaling: " + ", ".join(f"{k} -> {v / base:.2f}x" for k, v in rates.items()))


if __name__ == "__main__":
    main()
