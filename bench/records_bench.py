"""Measure the record sink (services/records.py): cost of one audit record.

  python -m bench.records_bench [--records 2000] [--runs 5]

Writes ``--records`` audit records of a fashion-mnist transfer (``TransferAudit.record``:
the content hash of the 784-byte input, ``json.dumps``, one ``os.write``) to a file in the
current directory's filesystem, with and without ``fsync`` per record. Prints one JSON
line per run (median and p99 per record, µs) and the medians of the per-run figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hybridmesh.common.v1 import routing_pb2
from router_service.audit import AUDIT_STREAM, TransferAudit
from services.records import RecordSink
from services.tensors import encode_tensor


def measure(records: int, runs: int) -> dict[str, dict[str, float]]:
    tensor = encode_tensor("image", np.zeros((1, 1, 28, 28), dtype=np.uint8))
    summary: dict[str, dict[str, float]] = {}
    for fsync in (True, False):
        medians, p99s = [], []
        for run in range(runs):
            with tempfile.TemporaryDirectory(dir=".") as directory:
                sink = RecordSink.open(Path(directory) / "audit.jsonl", AUDIT_STREAM, fsync=fsync)
                audit = TransferAudit(sink, "127.0.0.1:10000")
                costs = []
                for n in range(records):
                    started = time.perf_counter()
                    audit.record(
                        request_id=f"bench-{n}",
                        privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC,
                        anonymiser="",
                        tensors=[tensor],
                        purpose="escalation",
                    )
                    costs.append(time.perf_counter() - started)
                sink.close()
            costs_us = np.array(costs) * 1e6
            medians.append(float(np.median(costs_us)))
            p99s.append(float(np.quantile(costs_us, 0.99)))
            _print({"fsync": fsync, "run": run, "median_us": medians[-1], "p99_us": p99s[-1]})
        summary["fsync" if fsync else "no-fsync"] = {
            "median_us": statistics.median(medians),
            "p99_us": statistics.median(p99s),
        }
    return summary


def _print(line: object) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    _print(measure(args.records, args.runs))


if __name__ == "__main__":
    main()
