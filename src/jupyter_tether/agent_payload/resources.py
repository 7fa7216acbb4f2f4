"""What the box has and what each job uses: host RAM, swap, load and disks; GPUs through
``nvidia-smi``; per job (its whole process group) CPU, RSS now and peak, threads, open files
and GPU memory; and why a job died (``job_reason``).

Sampling runs only while someone asks or watches: each ask (job status or list, a follow,
``resources``) extends a short lease, during which one thread samples once a second (so CPU
percentages and peaks are there when someone looks); with no lease, nothing runs. Every
sample's CPU time is measured and reported (``sampler`` in the ``resources`` result).

Job processes are found in /proc (Linux) by process group (the job's command leads its
own) or session (the wrapper's); elsewhere jobs get no live figures, only what the wrapper
records at their end (peak RSS and CPU time of the reaped tree, from getrusage).
"""

import os
import shutil
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from . import gpu
from .args import float_arg
from .job_reason import classify
from .job_registry import RUNNING, Job, JobRegistry
from .supervisor import Request, Supervisor
from .wire import arg

GIB = 1024 * 1024 * 1024
SAMPLE_INTERVAL_S = 1.0
WATCH_S = 15.0  # the lease one ask buys
MAX_WATCH_S = 600.0
GPU_TIMEOUT_S = 5.0
GPU_BACKOFF_S = 30.0  # after nvidia-smi hung or failed, and between looks for a missing one
LOG_TAIL_BYTES = 16 * 1024
RAM_WARN_FRACTION = 0.05
DISK_WARN_BYTES = GIB
GPU_WARN_PERCENT = 95.0
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge number
NO_NVIDIA_SMI = "no nvidia-smi on this machine (a CPU or TPU box?): no GPU figures"

_HAS_PROC = os.path.exists("/proc/self/stat")
try:
    _CLK_TCK = float(os.sysconf("SC_CLK_TCK"))
    _PAGE = int(os.sysconf("SC_PAGE_SIZE"))
except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
    _CLK_TCK, _PAGE = 100.0, 4096

# pid -> (pgrp, session, ticks incl. reaped children, threads, rss bytes)
ProcTable = Dict[int, Tuple[int, int, int, int, int]]


# --- /proc and the host ---------------------------------------------------------------------


def read_procs() -> ProcTable:
    """Every live (non-zombie) process, from /proc/<pid>/stat; {} where there is no /proc."""
    table: ProcTable = {}
    if not _HAS_PROC:
        return table
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) < 22 or fields[0] in (b"Z", b"X"):
            continue
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        table[int(name)] = (int(fields[2]), int(fields[3]), ticks, int(fields[17]),
                            int(fields[21]) * _PAGE)
    return table


def _peak_rss(pid: int) -> int:
    """VmHWM: the process's own peak RSS (0 when unknown)."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _fds(pid: int, gpu_check: bool) -> Tuple[int, bool]:
    """Open file count, and (when asked) whether one of them is an NVIDIA device."""
    folder = "/proc/%d/fd" % pid
    try:
        names = os.listdir(folder)
    except OSError:
        return 0, False
    if gpu_check:
        for name in names:
            try:
                if os.readlink(os.path.join(folder, name)).startswith("/dev/nvidia"):
                    return len(names), True
            except OSError:
                continue
    return len(names), False


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _meminfo() -> Dict[str, int]:
    values: Dict[str, int] = {}
    for line in (_read_text("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    return values


def cgroup_dirs() -> List[Tuple[str, int]]:
    """Memory cgroup folders of this process, innermost first, each with its version."""
    found: List[Tuple[str, int]] = []
    for line in (_read_text("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, version = "/sys/fs/cgroup", 2
        elif "memory" in parts[1].split(","):
            base, version = "/sys/fs/cgroup/memory", 1
        else:
            continue
        path = parts[2].strip("/")
        while True:
            folder = os.path.join(base, path) if path else base
            if os.path.isdir(folder):
                found.append((folder, version))
            if not path:
                break
            path = os.path.dirname(path)
    return found


def cgroup_memory(dirs: List[Tuple[str, int]]) -> Optional[Dict[str, int]]:
    """The tightest memory limit over this process's cgroups and that cgroup's usage (page
    cache that can be dropped left out), or None when nothing limits it."""
    best: Optional[Dict[str, int]] = None
    for folder, version in dirs:
        names = ("memory.max", "memory.current", "inactive_file") if version == 2 else \
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        text = (_read_text(os.path.join(folder, names[0])) or "").strip()
        if not text.isdigit() or int(text) >= UNLIMITED:
            continue
        limit = int(text)
        if best is not None and limit >= best["limit"]:
            continue
        used_text = (_read_text(os.path.join(folder, names[1])) or "").strip()
        used = int(used_text) if used_text.isdigit() else 0
        for line in (_read_text(os.path.join(folder, "memory.stat")) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == names[2] and value.strip().isdigit():
                used = max(0, used - int(value))
                break
        best = {"limit": limit, "used": used}
    return best


def host_sample(root_dir: str, cgroups: List[Tuple[str, int]]) -> Dict[str, Any]:
    """RAM (the cgroup's limit where tighter than the machine's), swap, load, CPUs, disks."""
    mem = _meminfo()
    total = mem.get("MemTotal")
    available = mem.get("MemAvailable", mem.get("MemFree"))
    limit = cgroup_memory(cgroups)
    if limit is not None and (total is None or limit["limit"] < total):
        total = limit["limit"]
        free = max(0, limit["limit"] - limit["used"])
        available = free if available is None else min(available, free)
    try:
        load: Optional[List[float]] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    try:
        usable: Optional[int] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    disks = []
    for path in (root_dir, "/tmp"):
        try:
            usage = shutil.disk_usage(path)
        except OSError:
            continue
        disks.append({"path": path, "total": usage.total, "free": usage.free})
    return {"cpu_count": os.cpu_count(), "cpu_usable": usable, "load": load,
            "mem_total": total, "mem_available": available,
            "mem_limited_by": "cgroup" if limit is not None and total == limit["limit"] else
            "machine", "swap_total": mem.get("SwapTotal"), "swap_free": mem.get("SwapFree"),
            "disks": disks}


def _gib(value: float) -> str:
    return "%.1f GiB" % (value / GIB)


def warnings_for(host: Optional[Dict[str, Any]], gpus: Optional[Dict[str, Any]]) -> List[str]:
    """Short lines an agent should see: RAM under 5%, a disk under 1 GiB, a GPU over 95%."""
    found: List[str] = []
    if host:
        total, available = host.get("mem_total"), host.get("mem_available")
        if total and available is not None and available < RAM_WARN_FRACTION * total:
            found.append("RAM nearly full: %s of %s available" % (_gib(available), _gib(total)))
        seen = set()
        for disk in host.get("disks") or []:
            if disk["free"] < DISK_WARN_BYTES and disk["free"] not in seen:
                seen.add(disk["free"])
                found.append("disk nearly full: %.0f MiB free on %s"
                             % (disk["free"] / 1048576.0, disk["path"]))
    for device in (gpus or {}).get("devices") or []:
        percent = gpu.memory_percent(device)
        if percent is not None and percent > GPU_WARN_PERCENT:
            found.append("GPU %s memory %.0f%% used (%s of %s)" % (
                device.get("index"), percent, _gib(device["mem_used"]),
                _gib(device["mem_total"])))
    return found


def sample_gpus(timeout: float = GPU_TIMEOUT_S) -> Dict[str, Any]:
    """GPUs and their processes through nvidia-smi; ``available`` False, with a note and no
    error, where there is none."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return {"available": False, "note": NO_NVIDIA_SMI}
    result: Dict[str, Any] = {"available": True, "devices": [], "processes": []}
    try:
        proc = subprocess.run(gpu.gpu_argv(binary), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        result["error"] = "nvidia-smi did not answer within %gs" % timeout
        return result
    except OSError as exc:
        result["error"] = "nvidia-smi could not run: %s" % exc
        return result
    devices, other = gpu.parse_gpus(proc.stdout)
    if not devices:
        said = (other or proc.stderr.strip().splitlines() or
                ["exit code %d, no output" % proc.returncode])[0]
        if "no devices were found" in said.lower():
            return {"available": False, "note": "nvidia-smi found no GPU: %s" % said}
        result["error"] = "nvidia-smi: %s" % said
        return result
    apps: List[Dict[str, Any]] = []
    try:
        listed = subprocess.run(gpu.apps_argv(binary), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, errors="replace",
                                timeout=timeout)
        apps, other = gpu.parse_apps(listed.stdout)
        if listed.returncode != 0:
            result["processes_error"] = "nvidia-smi: %s" % (
                (other or listed.stderr.strip().splitlines() or ["exit code %d"
                                                                  % listed.returncode])[0])
    except (subprocess.TimeoutExpired, OSError) as exc:
        result["processes_error"] = "nvidia-smi process list failed: %s" % exc
    result.update(gpu.summarise(devices, apps))
    return result


def _log_tail(job: Job) -> str:
    path = job.meta.get("log_path")
    start = job.meta.get("log_start_offset") or 0
    if not isinstance(path, str):
        return ""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            begin = max(start, size - LOG_TAIL_BYTES)
            f.seek(begin)
            return f.read(LOG_TAIL_BYTES).decode("utf-8", "replace")
    except OSError:
        return ""


# --- the monitor ----------------------------------------------------------------------------


class ResourceMonitor:
    """Samples while leased, caches the last figures, and annotates job summaries."""

    def __init__(self, supervisor: Supervisor, registry: JobRegistry):
        self.sup = supervisor
        self.registry = registry
        self._cgroups = cgroup_dirs()
        self._lock = threading.Lock()  # the cached figures below
        self._sample_lock = threading.Lock()  # one sample at a time
        self._gpu_lock = threading.Lock()  # one nvidia-smi at a time
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._watch_until = 0.0
        self._sampled_at = 0.0  # monotonic
        self._host: Optional[Dict[str, Any]] = None
        self._gpus: Dict[str, Any] = {"available": None, "note": "not sampled yet"}
        self._gpu_due = 0.0
        self._usage: Dict[str, Dict[str, Any]] = {}  # running jobs, by id
        self._gpu_owner: Dict[int, str] = {}  # GPU process pid -> job id
        self._ticks: Dict[str, Tuple[float, int]] = {}  # job id -> (monotonic, ticks)
        self._peaks: Dict[str, Dict[str, int]] = {}  # job id -> observed peaks
        # job id -> (the state it was worked out for, the reason): one log read per end
        self._reasons: Dict[str, Tuple[str, Optional[Dict[str, str]]]] = {}
        self._warnings: List[str] = []
        self.cost = {"samples": 0, "cpu_s": 0.0, "gpu_samples": 0, "gpu_wall_s": 0.0,
                     "last_ms": 0.0}

    # --- leases -----------------------------------------------------------------------------

    def watch(self, seconds: float = WATCH_S) -> None:
        """Keep sampling once a second for ``seconds`` more."""
        with self._lock:
            self._watch_until = max(self._watch_until, time.monotonic() + seconds)
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._loop, name="tether-resources",
                                            daemon=True)
            self._thread.start()

    def asked(self) -> None:
        """A job status or list: lease, and fresh process figures (never nvidia-smi here:
        this runs on the kernel's shell thread)."""
        self.watch()
        self.fresh(gpus=False)

    def fresh(self, gpus: bool, max_age: float = SAMPLE_INTERVAL_S) -> None:
        """Sample unless the last sample is younger than ``max_age`` (GPUs too when asked
        and due). Waits at most for another thread's /proc sample (ms), never for another
        thread's nvidia-smi."""
        new_gpus = self._gpus_if_due() if gpus else False
        if not new_gpus and time.monotonic() - self._sampled_at < max_age:
            return
        with self._sample_lock:  # held for the /proc work only: a few ms
            self._sample()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if time.monotonic() >= self._watch_until:
                    self._thread = None
                    return
            started = time.monotonic()
            try:
                self.fresh(gpus=True, max_age=SAMPLE_INTERVAL_S / 2)
            except Exception:  # a bad sample must not end the sampling
                self.sup.counters["resources_errors"] += 1
            self._stop.wait(max(0.05, SAMPLE_INTERVAL_S - (time.monotonic() - started)))
        with self._lock:
            self._thread = None

    # --- sampling ---------------------------------------------------------------------------

    def _gpus_if_due(self) -> bool:
        """Ask nvidia-smi when due and no other thread is asking; True when it answered.

        Outside the sample lock: nvidia-smi may take seconds, and a job status never waits
        for it."""
        if time.monotonic() < self._gpu_due or not self._gpu_lock.acquire(blocking=False):
            return False
        try:
            started = time.monotonic()
            result = sample_gpus()
            ended = time.monotonic()
            failed = not result.get("available") or "error" in result
            self._gpu_due = ended + (GPU_BACKOFF_S if failed else SAMPLE_INTERVAL_S * 0.9)
            with self._lock:
                self._gpus = result
                self.cost["gpu_samples"] += 1
                self.cost["gpu_wall_s"] += ended - started
            if "error" in result:
                self.sup.counters["resources_gpu_errors"] += 1
            return True
        finally:
            self._gpu_lock.release()

    def _sample(self) -> None:
        """One sample of the host and the jobs' processes (call with ``_sample_lock``)."""
        cpu_start = time.thread_time()
        with self.registry.lock:
            jobs = [(j.job_id, j.meta.get("pid"), j.meta.get("wrapper_pid"),
                     j.meta.get("started_at")) for j in self.registry.jobs.values()
                    if j.state == RUNNING]
        host = host_sample(self.sup.root_dir, self._cgroups)
        table = read_procs()
        by_group: Dict[int, List[int]] = {}
        by_session: Dict[int, List[int]] = {}
        for pid, row in table.items():
            by_group.setdefault(row[0], []).append(pid)
            by_session.setdefault(row[1], []).append(pid)
        with self._lock:
            gpus = self._gpus
        apps = gpus.get("processes") or []
        has_gpus = bool(gpus.get("devices"))
        now = time.monotonic()
        usage: Dict[str, Dict[str, Any]] = {}
        owner: Dict[int, str] = {}
        gpu_pids = {app.get("pid") for app in apps}
        for job_id, leader, wrapper_pid, started_at in jobs:
            if not _HAS_PROC or not isinstance(leader, int):
                continue
            members = set(by_group.get(leader, ()))
            if isinstance(wrapper_pid, int):
                members.update(p for p in by_session.get(wrapper_pid, ()) if p != wrapper_pid)
            usage[job_id] = self._job_usage(job_id, members, table, apps, has_gpus, now,
                                            started_at)
            for found in members & gpu_pids:
                owner[found] = job_id
        for gone in [k for k in self._ticks if k not in usage]:
            del self._ticks[gone]
        cost_s = time.thread_time() - cpu_start
        with self._lock:
            self._host = host
            self._usage = usage
            self._gpu_owner = owner
            self._warnings = warnings_for(host, self._gpus)
            self._sampled_at = time.monotonic()
            self.cost["samples"] += 1
            self.cost["cpu_s"] += cost_s
            self.cost["last_ms"] = round(cost_s * 1000, 3)

    def _job_usage(self, job_id: str, members: Any, table: ProcTable,
                   apps: List[Dict[str, Any]], has_gpus: bool, now: float,
                   started_at: Any) -> Dict[str, Any]:
        rss = ticks = threads = files = 0
        hwm = 0
        gpu_open = False
        for pid in members:
            _, _, proc_ticks, proc_threads, proc_rss = table[pid]
            rss += proc_rss
            ticks += proc_ticks
            threads += proc_threads
            count, on_gpu = _fds(pid, has_gpus and not gpu_open)
            files += count
            gpu_open = gpu_open or on_gpu
            hwm = max(hwm, _peak_rss(pid))
        previous = self._ticks.get(job_id)
        if previous is not None and now > previous[0]:
            window = now - previous[0]
            used = max(0, ticks - previous[1])
        else:  # first look: the average since it started
            window = max(1e-3, time.time() - started_at) if isinstance(
                started_at, (int, float)) else 0.0
            used = ticks
        self._ticks[job_id] = (now, ticks)
        gpu_mem = None
        gpu_ids = []
        for app in apps:
            if app.get("pid") in members:
                gpu_mem = (gpu_mem or 0) + (app.get("mem_used") or 0)
                if app.get("gpu_index") is not None and app["gpu_index"] not in gpu_ids:
                    gpu_ids.append(app["gpu_index"])
        peaks = self._peaks.setdefault(job_id, {"rss": 0, "gpu_mem": 0})
        peaks["rss"] = max(peaks["rss"], rss, hwm)
        if gpu_mem:
            peaks["gpu_mem"] = max(peaks["gpu_mem"], gpu_mem)
        result: Dict[str, Any] = {
            "cpu_percent": round(100.0 * used / _CLK_TCK / window, 1) if window else None,
            "cpu_s": round(ticks / _CLK_TCK, 2), "rss": rss, "rss_peak": peaks["rss"],
            "threads": threads, "procs": len(members), "open_files": files}
        if gpu_mem is not None:
            result["gpu_mem"] = gpu_mem
            result["gpus"] = gpu_ids
        elif gpu_open:  # uses a GPU, but nvidia-smi shows no pid of ours (a container)
            result["gpu_open"] = True
        return result

    # --- faces ------------------------------------------------------------------------------

    def annotate(self, job: Job, summary: Dict[str, Any]) -> None:
        """Add ``usage`` (and ``reason``, ``warnings``) to a job summary. Called with the
        registry lock held: cached figures only, and one log read per ended job."""
        if job.state == RUNNING:
            with self._lock:
                live = self._usage.get(job.job_id)
                warnings = list(self._warnings)
            if live is not None:
                summary["usage"] = dict(live)
            if warnings:
                summary["warnings"] = warnings
            return
        ended = job.exit or {}
        with self._lock:
            peaks = dict(self._peaks.get(job.job_id) or {})
            state, reason = self._reasons.get(job.job_id, ("", None))
            host = self._host
        usage: Dict[str, Any] = {}
        peak = max(peaks.get("rss") or 0, ended.get("max_rss") or 0)
        if peak:
            usage["rss_peak"] = peak
        if isinstance(ended.get("cpu_s"), (int, float)):
            usage["cpu_s"] = ended["cpu_s"]
        if peaks.get("gpu_mem"):
            usage["gpu_mem_peak"] = peaks["gpu_mem"]
        if usage:
            summary["usage"] = usage
        if state != job.state:
            if host is None:
                host = host_sample(self.sup.root_dir, self._cgroups)
            reason = classify(job.state, job.exit, job.killed, _log_tail(job), peak or None,
                              host.get("mem_total"))
            with self._lock:
                self._reasons[job.job_id] = (job.state, reason)
        if reason is not None:
            summary["reason"] = dict(reason)

    def op_resources(self, req: Request) -> Dict[str, Any]:
        want_gpus = arg(req.args, "gpus", bool, True)
        want_jobs = arg(req.args, "jobs", bool, True)
        watch_s = float_arg(req.args, "watch_s", WATCH_S, 0.0, MAX_WATCH_S, clamp=True)
        # While the sampler runs, its figures are at most a second old: no extra nvidia-smi.
        self.fresh(gpus=want_gpus and self._thread is None)
        if want_gpus and self._gpus.get("available") is None:
            with self._gpu_lock:  # another thread may be asking nvidia-smi for the first time
                pass
            if self._gpus.get("available") is None:
                self.fresh(gpus=True)
        if watch_s > 0:
            self.watch(watch_s)
        result: Dict[str, Any] = {}
        if want_jobs:
            with self.registry.lock:
                running = [j for j in self.registry.jobs.values() if j.state == RUNNING]
                running.sort(key=lambda j: j.meta.get("started_at") or 0, reverse=True)
                names = [(j.job_id, j.meta.get("name"), j.meta.get("command"),
                          j.meta.get("pid")) for j in running]
        with self._lock:
            result["host"] = self._host
            if want_gpus:
                result["gpus"] = self._gpus
            if want_jobs:
                jobs = []
                for job_id, name, command, pid in names:
                    entry = {"job_id": job_id, "name": name, "command": command, "pid": pid,
                             "usage": self._usage.get(job_id)}
                    jobs.append(entry)
                result["jobs"] = jobs
            if want_gpus and self._gpus.get("processes"):
                result["gpus"] = dict(self._gpus, processes=[
                    dict(app, job_id=self._gpu_owner.get(app.get("pid")))
                    for app in self._gpus["processes"]])
            result["warnings"] = list(self._warnings)
            sampling = self._thread is not None
            cost = dict(self.cost)
        result["sampler"] = {
            "active": sampling, "interval_s": SAMPLE_INTERVAL_S,
            "watch_s": max(0.0, round(self._watch_until - time.monotonic(), 1)),
            "samples": cost["samples"], "cpu_s": round(cost["cpu_s"], 4),
            "last_sample_ms": cost["last_ms"],
            "gpu_samples": cost["gpu_samples"], "gpu_wall_s": round(cost["gpu_wall_s"], 3)}
        return result

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
