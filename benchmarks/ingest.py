#!/usr/bin/env python
"""Ingest throughput: DCMTK storescu -> mammonode, beside storescu -> DCMTK storescp.

Ten sends of the density exam (four 10.4 MB MG instances, distinct UIDs per send), each send
one storescu association, one after the other; the same files to both receivers in the same
run. Prints MB/s, instances/s and per-send seconds (median).

    .venv/bin/python benchmarks/ingest.py [--sends 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, free_port, make_exams, tool, wait_port, write_config


def send_all(port: int, exams: list[list[Path]], called: str) -> list[float]:
    durations = []
    for files in exams:
        start = time.perf_counter()
        run = subprocess.run(
            [tool("storescu"), "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
            capture_output=True,
            text=True,
        )
        durations.append(time.perf_counter() - start)
        if run.returncode != 0:
            sys.exit(f"storescu failed: {run.stderr}")
    return durations


def stow_all(port: int, exams: list[list[Path]]) -> list[float]:
    """One STOW-RS request (multipart/related, the four instances) per send."""
    import urllib.request
    import uuid

    durations = []
    for files in exams:
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
                for f in files
            )
            + f"--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/dicomweb/studies",
            data=body,
            method="POST",
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            },
        )
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            if response.status != 200:
                sys.exit(f"STOW-RS answered {response.status}")
            response.read()
        durations.append(time.perf_counter() - start)
    return durations


def report(name: str, durations: list[float], exams: list[list[Path]]) -> dict:
    total = sum(durations)
    size = sum(f.stat().st_size for files in exams for f in files) / 1e6
    count = sum(len(files) for files in exams)
    row = {
        "receiver": name,
        "MB/s": size / total,
        "instances/s": count / total,
        "median_send_s": statistics.median(durations),
        "total_s": total,
        "MB": size,
        "instances": count,
    }
    print(
        f"{name:28} {row['MB/s']:7.1f} MB/s {row['instances/s']:6.2f} inst/s  median send {row['median_send_s']:.2f} s"
        f"  ({count} instances, {size:.0f} MB, {total:.1f} s)"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sends", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mammonode-bench-") as tmp:
        tmp = Path(tmp)
        exams = make_exams(tmp / "exams", args.sends)
        # DCMTK storescp, writing to disk.
        port = free_port()
        scp = subprocess.Popen(
            [tool("storescp"), "-aet", "STORESCP", "-od", str(tmp / "scp"), "+uf", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        (tmp / "scp").mkdir()
        wait_port(port)
        try:
            scp_times = send_all(port, exams, "STORESCP")
        finally:
            scp.terminate()
            scp.wait()
        # mammonode serve (receiving only), C-STORE then STOW-RS (fresh storage each).
        runs = {}
        for mode in ("dimse", "stow"):
            port, web_port = free_port(), free_port()
            config = write_config(
                tmp / f"{mode}.toml",
                port,
                tmp / f"storage-{mode}",
                f'[dicomweb]\nenabled = true\nallow_anonymous = true\nhost = "127.0.0.1"\nport = {web_port}\n',
            )
            node = subprocess.Popen([sys.executable, "-m", "mammonode.cli", "serve", "--config", str(config)], cwd=REPO)
            wait_port(port)
            wait_port(web_port)
            try:
                runs[mode] = send_all(port, exams, "MAMMONODE") if mode == "dimse" else stow_all(web_port, exams)
            finally:
                node.terminate()
                node.wait()
        print(
            f"{args.sends} sends of the density exam: storescu (one association per send) or one STOW-RS "
            "request per send; mammonode fsyncs each file and commits each instance to SQLite before answering"
        )
        report("DCMTK storescp", scp_times, exams)
        report("mammonode C-STORE", runs["dimse"], exams)
        report("mammonode STOW-RS (HTTP)", runs["stow"], exams)


if __name__ == "__main__":
    main()
