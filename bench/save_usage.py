"""Where a checkpoint save's time went, beside the store's own account (the result's "usage": the encoder's
chunks and the process, from getrusage): the host's CPUs over the save (/proc/stat: every process's CPU
time, and the hypervisor's steal), other processes' CPU time (/proc/PID/stat), the kernel's page reclaim
(/proc/vmstat: direct reclaim in the faulting threads, kswapd's) and the free memory before it (/proc/meminfo).
Linux only; on another system the host columns are empty. Imported by bench/checkpoint.py and bench/serve.py."""

import os
import time

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
VMSTAT = (
    "pgscan_direct",
    "pgsteal_direct",
    "pgscan_kswapd",
    "allocstall",
    "compact_stall",
    "pgmajfault",
    "thp_fault_alloc",
    "thp_fault_fallback",
)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def host_cpu() -> dict:
    """The host's CPU seconds so far (/proc/stat's first line): busy (user, nice, system, irq, softirq),
    idle (idle, iowait) and steal."""
    line = _read("/proc/stat").split("\n", 1)[0].split()
    if not line or line[0] != "cpu":
        return {}
    v = [int(x) / TICK for x in line[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v + [0.0] * (8 - len(v))
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (every thread), or None when it is gone."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of proc(5))


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of process `pid`'s threads, summed by thread name (/proc/PID/task/TID/stat: the
    core names its threads lt-pool, lt-encode, lt-write; a thread's name is its process's unless set)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/stat")
        if not text:
            continue  # the thread ended
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def vmstat() -> dict:
    out = dict.fromkeys(VMSTAT, 0)
    for line in _read("/proc/vmstat").splitlines():
        name, _, value = line.partition(" ")
        key = "allocstall" if name.startswith("allocstall") else name  # allocstall_{dma,normal,movable,...}
        if key in out:
            out[key] += int(value)
    return out


def meminfo() -> dict:
    out = {}
    for line in _read("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemFree", "MemAvailable", "Cached", "Dirty"):
            out[name] = int(rest.split()[0]) * 1024
    return out


def snapshot(pids: dict[str, int] | None = None) -> dict:
    return {
        "time": time.perf_counter(),
        "cpu": host_cpu(),
        "vm": vmstat(),
        "pids": {k: process_cpu(p) for k, p in (pids or {}).items()},
        "self": process_cpu(os.getpid()),
        "threads": {"self": threads_cpu(os.getpid()), **{k: threads_cpu(p) for k, p in (pids or {}).items()}},
    }


def host_delta(before: dict, after: dict, mem: dict) -> dict:
    """What the host did between two snapshots: busy/steal CPU seconds, this process's and the named ones'
    CPU seconds, the reclaim counters; `mem`: /proc/meminfo before."""
    cpu = {k: after["cpu"].get(k, 0.0) - before["cpu"].get(k, 0.0) for k in ("busy", "idle", "steal")}
    own = (after["self"] or 0.0) - (before["self"] or 0.0)
    pids = {
        k: (after["pids"][k] - v if v is not None and after["pids"].get(k) is not None else None)
        for k, v in before["pids"].items()
    }
    threads = {}
    for who, now in after["threads"].items():
        was = before["threads"].get(who, {})
        d = {name: t - was.get(name, 0.0) for name, t in now.items()}  # a thread started meanwhile: all of it
        threads[who] = dict(sorted(((n, t) for n, t in d.items() if t > 0), key=lambda x: -x[1]))
    return {
        "threads_cpu_seconds": threads,  # {"self" | name in pids: {thread name: CPU seconds over the save}}
        "host_busy_seconds": cpu["busy"],
        "host_steal_seconds": cpu["steal"],
        "self_cpu_seconds": own,
        "others_cpu_seconds": cpu["busy"] - own,  # every other process (and the kernel's threads)
        "pids_cpu_seconds": pids,
        "vm": {k: after["vm"][k] - before["vm"][k] for k in VMSTAT},
        "mem_before": mem,
    }


def timed_save(save, pids: dict[str, int] | None = None) -> tuple[dict, float, dict]:
    """Runs save() (a store save returning its result dict); returns (result, wall seconds, host_delta)."""
    mem = meminfo()
    before = snapshot(pids)
    t = time.perf_counter()
    r = save()
    seconds = time.perf_counter() - t
    return r, seconds, host_delta(before, snapshot(pids), mem)


HEADER = (
    "| save | wall s | encode busy / waiting s | encoder threads | encoder CPU s (user / sys) | CPU / thread time | "
    "encoder faults | encoder switches (vol. / invol.) | process CPU s (user / sys) | process faults (minor / major) | "
    "other processes' CPU s | host steal s | direct reclaim (stalls / pages scanned / compaction stalls) | kswapd pages scanned | "
    "free / available GB before | CPU s by thread name (this process; others) |\n"
    "|---|---:|---|---:|---|---:|---:|---|---|---|---|---:|---|---:|---|---|"
)


def row(label: str, seconds: float, r: dict, host: dict, named: str = "") -> str:
    """One line of HEADER's table: `r` a save's result (its "usage"), `host` timed_save's host_delta;
    `named`: the pids_cpu_seconds entries to print beside the other processes' total ("engine" ...)."""
    u = r.get("usage") or {}
    e, p = u.get("encode") or {}, u.get("process") or {}
    cpu = e.get("user_seconds", 0.0) + e.get("system_seconds", 0.0)
    wall = e.get("wall_seconds", 0.0)
    busy = r.get("encode_seconds") or 0.0
    threads = f"{wall / busy:.1f}" if busy else "-"
    share = f"{cpu / wall:.2f}" if wall else "-"
    vm, mem = host.get("vm", {}), host.get("mem_before", {})
    others = f"{host['others_cpu_seconds']:.2f}" if host.get("host_busy_seconds") else "-"
    for k, v in (host.get("pids_cpu_seconds") or {}).items():
        if not named or k in named.split(","):
            others += f" ({k} {v:.2f})" if v is not None else f" ({k} gone)"
    free = (
        f"{mem['MemFree'] / 1e9:.1f} / {mem['MemAvailable'] / 1e9:.1f}"
        if "MemFree" in mem and "MemAvailable" in mem
        else "-"
    )
    by_thread = []
    for who, names in (host.get("threads_cpu_seconds") or {}).items():
        top = ", ".join(f"{n} {t:.2f}" for n, t in list(names.items())[:4])
        by_thread.append(f"{who}: {top or '-'}")
    return (
        f"| {label} | {seconds:.2f} | {busy:.2f} / {u.get('encode_wait_seconds', 0.0):.2f} | {threads} | "
        f"{e.get('user_seconds', 0.0):.2f} / {e.get('system_seconds', 0.0):.2f} | {share} | "
        f"{e.get('minor_faults', 0):,} | {e.get('voluntary_switches', 0):,} / {e.get('involuntary_switches', 0):,} | "
        f"{p.get('user_seconds', 0.0):.2f} / {p.get('system_seconds', 0.0):.2f} | "
        f"{p.get('minor_faults', 0):,} / {p.get('major_faults', 0):,} | {others} | "
        f"{host.get('host_steal_seconds', 0.0):.2f} | {vm.get('allocstall', 0):,} / {vm.get('pgscan_direct', 0):,} / "
        f"{vm.get('compact_stall', 0):,} | "
        f"{vm.get('pgscan_kswapd', 0):,} | {free} | {'; '.join(by_thread)} |"
    )


LEGEND = (
    "encode busy: the encoder's thread encoding (encode_seconds), waiting: for the diff's next tensors; encoder "
    "threads: its chunks' thread-seconds / busy (how many of the pool's threads it kept running, on average); "
    "CPU / thread time: the CPU time those threads got while running its chunks (below 1: off their CPUs, "
    "descheduled or blocked); process: getrusage over the diff, encode and write, every thread; other processes: "
    "the host's busy CPU time (/proc/stat) less this process's over the save; direct reclaim: /proc/vmstat "
    "allocstall and pgscan_direct (page allocations that had to free memory first, in the faulting thread), and "
    "compact_stall (that had to compact memory for a huge page); CPU by thread name: /proc/PID/task over the save, "
    "the four busiest names of this process and of the named others (the core's: lt-pool, lt-encode, lt-write)."
)
