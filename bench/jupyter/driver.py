"""Jupyter (ipykernel + jupyter_client) on the same workloads as capsule-bench.

Run with the venv made by ``bench/jupyter/setup.sh``::

    bench/.venv/bin/python bench/jupyter/driver.py [--quick] [--out FILE]

Prints one JSON document (stdout or --out) with, per workload, ``n``, ``median``, ``p99``,
``min``, ``max``, ``mean`` and ``unit``, computed exactly like capsule-bench (nearest-rank
percentiles). It is a benchmark, not a test: nothing here asserts a time.

Workloads (numbers match capsule-bench):

1. ``roundtrip``: ``execute("x=1")`` to its ``execute_reply`` on shell *and* ``status: idle`` on
   iopub (the point where a client knows the cell and all its output are done);
2. ``cold_ready`` / ``cold_first_result``: ``KernelManager.start_kernel()`` to
   ``wait_for_ready()``, and to the first ``x=1`` done;
4. ``print_lines`` / ``write_1mib``: stdout throughput, MB/s of stream text received by the
   client, every byte counted and checked;
5. ``cancel_*``: ``interrupt_kernel()`` to the ``execute_reply`` of the interrupted cell;
7. ``kernel_rss``: the kernel's VmRSS after a few cells.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

from jupyter_client.manager import KernelManager

import ipykernel
import jupyter_client

MIB = 1024 * 1024


def summary(values, unit):
    """n / median / p99 / min / max / mean, nearest-rank percentiles (same as capsule-bench)."""
    v = sorted(values)
    n = len(v)
    if n == 0:
        return {"n": 0, "unit": unit}

    def rank(p):
        return v[max(0, min(n - 1, math.ceil(p * n) - 1))]

    return {"n": n, "median": rank(0.5), "p99": rank(0.99), "min": v[0], "max": v[-1],
            "mean": statistics.fmean(v), "unit": unit}


class Kernel:
    """One kernel and its blocking client."""

    def __init__(self):
        t0 = time.perf_counter()
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.ready_s = time.perf_counter() - t0
        self.run("x=1")
        self.first_result_s = time.perf_counter() - t0

    def pid(self):
        prov = getattr(self.km, "provisioner", None)
        proc = getattr(prov, "process", None)
        return getattr(proc, "pid", None)

    def run(self, code, on_stream=None):
        """Executes ``code``; returns the execute_reply content once iopub is idle too."""
        msg_id = self.kc.execute(code, store_history=False)
        while True:  # iopub until this cell's `idle`: all of its output has arrived
            msg = self.kc.get_iopub_msg(timeout=300)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream" and on_stream is not None:
                on_stream(msg["content"]["text"])
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                break
        while True:  # the reply (usually already queued on the shell channel)
            msg = self.kc.get_shell_msg(timeout=300)
            if msg["parent_header"].get("msg_id") == msg_id:
                reply = msg["content"]
                break
        return reply

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def vmrss(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def bench_cold(n):
    ready, first = [], []
    for _ in range(n):
        k = Kernel()
        ready.append(k.ready_s * 1e6)
        first.append(k.first_result_s * 1e6)
        k.close()
    return summary(ready, "us"), summary(first, "us")


def bench_roundtrip(k, n, warmup):
    for _ in range(warmup):
        k.run("x=1")
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        k.run("x=1")
        out.append((time.perf_counter() - t0) * 1e6)
    return summary(out, "us")


def bench_output(k, code, expected_bytes, reps):
    rates = []
    ok = True
    received = 0
    for _ in range(reps):
        got = [0]

        def on_stream(text, got=got):
            got[0] += len(text.encode())

        t0 = time.perf_counter()
        reply = k.run(code, on_stream=on_stream)
        dt = time.perf_counter() - t0
        received = got[0]
        ok = ok and reply.get("status") == "ok" and got[0] == expected_bytes
        rates.append(got[0] / dt / 1e6)
    s = summary(rates, "MB/s")
    s.update({"bytes_expected": expected_bytes, "bytes_received": received, "verified": ok})
    return s


def bench_cancel(k, code, reps):
    """Starts ``code`` (which prints a marker first), interrupts it once the marker arrives,
    and times interrupt request -> execute_reply of that cell."""
    out = []
    statuses = []
    for _ in range(reps):
        msg_id = k.kc.execute(code, store_history=False)
        # Wait for the marker: the cell is running.
        while True:
            msg = k.kc.get_iopub_msg(timeout=60)
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream"
                    and "READY" in msg["content"]["text"]):
                break
        t0 = time.perf_counter()
        k.km.interrupt_kernel()
        while True:
            msg = k.kc.get_shell_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == msg_id:
                break
        out.append((time.perf_counter() - t0) * 1e6)
        statuses.append(msg["content"].get("ename") or msg["content"].get("status"))
        # Drain iopub to idle so the next rep starts clean.
        while True:
            m = k.kc.get_iopub_msg(timeout=60)
            if (m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                    and m["content"]["execution_state"] == "idle"):
                break
    s = summary(out, "us")
    s["outcomes"] = sorted(set(statuses))
    return s


CANCEL_CELLS = {
    "cancel_busy": "print('READY', flush=True)\nwhile True: pass",
    "cancel_sleep": "import time\nprint('READY', flush=True)\ntime.sleep(100)",
    "cancel_flood_busy": "print('READY', flush=True)\ni = 0\nwhile True:\n    print('line', i)\n    i += 1",
    "cancel_flood_sleep": (
        "import threading, time, sys\n"
        "_stop = threading.Event()\n"
        "def _f():\n"
        "    while not _stop.is_set():\n"
        "        sys.stdout.write('y' * 200 + '\\n')\n"
        "_t = threading.Thread(target=_f, daemon=True)\n"
        "print('READY', flush=True)\n"
        "_t.start()\n"
        "try:\n"
        "    time.sleep(100)\n"
        "finally:\n"
        "    _stop.set(); _t.join()\n"
    ),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--out", help="write the JSON here instead of stdout")
    args = ap.parse_args()
    q = args.quick
    sizes = {
        "cold": 2 if q else 5,
        "roundtrip": 50 if q else 2000,
        "warmup": 10 if q else 200,
        "lines": 1000 if q else 100_000,
        "mib": 1 if q else 100,
        "out_reps": 1 if q else 2,
        "cancel": 3 if q else 20,
    }
    t_all = time.perf_counter()
    res = {
        "tool": "jupyter",
        "quick": q,
        "sizes": sizes,
        "versions": {
            "python": platform.python_version(),
            "executable": sys.executable,
            "ipykernel": ipykernel.__version__,
            "jupyter_client": jupyter_client.__version__,
            "transport": "tcp",
        },
        "workloads": {},
    }
    w = res["workloads"]
    w["cold_ready"], w["cold_first_result"] = bench_cold(sizes["cold"])
    k = Kernel()
    try:
        w["roundtrip"] = bench_roundtrip(k, sizes["roundtrip"], sizes["warmup"])
        pid = k.pid()
        w["kernel_rss"] = {"bytes": vmrss(pid) if pid else None, "pid": pid}
        n = sizes["lines"]
        expected = sum(len("line %d\n" % i) for i in range(n))
        w["print_lines"] = bench_output(
            k, "for i in range(%d): print('line', i)" % n, expected, sizes["out_reps"])
        m = sizes["mib"]
        w["write_1mib"] = bench_output(
            k, "import sys\n_b = 'x' * %d\nfor _ in range(%d): sys.stdout.write(_b)\n" % (MIB, m),
            m * MIB, sizes["out_reps"])
        for name, code in CANCEL_CELLS.items():
            w[name] = bench_cancel(k, code, sizes["cancel"])
    finally:
        k.close()
    res["elapsed_s"] = time.perf_counter() - t_all
    text = json.dumps(res, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
