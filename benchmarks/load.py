#!/usr/bin/env python
"""Receive load: 8 concurrent senders, 5 four-view studies each, into `mammonode serve`.

The studies are distinct copies of the shared density exam (../shared/tools/mgdicom.py
--key), 10.4 MB per instance. Each sender is one pynetdicom association sending its files
one C-STORE after the other; the per-C-STORE latency (request sent to response received)
is recorded. The node runs with its worker disabled, so this measures the listener and
the durable store alone. Prints instances/s, MB/s and the 50th/99th percentile latency.

    .venv/bin/python benchmarks/load.py [--senders 8] [--studies-per-sender 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, free_port, make_exams, wait_port, write_config


def sender(port: int, files: list[Path], latencies: list[float], failures: list[str]) -> None:
    import pydicom
    from pynetdicom import AE, _config
    from pynetdicom.presentation import build_context

    _config.STORE_SEND_CHUNKED_DATASET = True  # stream from the file, as a modality would
    ae = AE(ae_title="LOADSCU")
    metas = [pydicom.filereader.read_file_meta_info(f) for f in files]
    for sop, ts in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.requested_contexts.append(build_context(sop, [ts]))
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
    if not assoc.is_established:
        failures.append("association not established")
        return
    for f in files:
        start = time.perf_counter()
        status = assoc.send_c_store(f)
        latencies.append(time.perf_counter() - start)
        if status is None or int(status.get("Status", -1)) != 0:
            failures.append(f"{f.name}: {status}")
    assoc.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--studies-per-sender", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mammonode-load-") as tmp:
        tmp = Path(tmp)
        exams = make_exams(tmp / "exams", args.senders * args.studies_per_sender)
        port, web = free_port(), free_port()
        config = write_config(
            tmp / "config.toml", port, tmp / "storage", f'[dicomweb]\nhost = "127.0.0.1"\nport = {web}\n'
        )
        node = subprocess.Popen([sys.executable, "-m", "mammonode.cli", "serve", "--config", str(config)], cwd=REPO)
        wait_port(port)
        time.sleep(6)  # let the start-up probe's half-open connection time out
        latencies: list[float] = []
        failures: list[str] = []
        groups = [[f for exam in exams[i :: args.senders] for f in exam] for i in range(args.senders)]
        threads = [threading.Thread(target=sender, args=(port, g, latencies, failures)) for g in groups]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        peak = 0.0
        for line in Path(f"/proc/{node.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
        node.terminate()
        node.wait()
        size = sum(f.stat().st_size for exam in exams for f in exam) / 1e6
    count = len(latencies)
    latencies.sort()
    p99 = latencies[min(count - 1, int(round(0.99 * (count - 1))))]
    print(
        f"{args.senders} concurrent senders x {args.studies_per_sender} studies: {count} instances, "
        f"{size:.0f} MB in {elapsed:.1f} s"
    )
    print(
        f"{count / elapsed:.2f} instances/s, {size / elapsed:.1f} MB/s, C-STORE latency p50 "
        f"{statistics.median(latencies):.3f} s, p99 {p99:.3f} s; listener peak RSS {peak:.0f} MB; "
        f"failures {len(failures)}"
    )


if __name__ == "__main__":
    main()
