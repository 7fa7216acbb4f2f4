"""NVIDIA GPUs as ``nvidia-smi`` reports them: the query command lines and a pure parser.

``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` prints one line per GPU, fields
joined by ", " in the order asked; ``--query-compute-apps`` one line per process using a
GPU. A field the card or driver cannot give reads ``[N/A]`` or ``[Not Supported]`` (MIG
mode: utilisation; many cards: power), which becomes None, never 0. The free-text field
(the name, the process name) is asked last, so a comma inside it cannot shift the others.

Nothing here runs a process: ``resources`` runs the commands and hands their output here.
"""

from typing import Any, Dict, List, Optional, Tuple

MIB = 1024 * 1024

# (field asked, key in the result, kind) in the order nvidia-smi prints them.
GPU_FIELDS: Tuple[Tuple[str, str, str], ...] = (
    ("index", "index", "int"),
    ("uuid", "uuid", "str"),
    ("utilization.gpu", "util", "float"),
    ("utilization.memory", "mem_util", "float"),
    ("memory.used", "mem_used", "mib"),
    ("memory.total", "mem_total", "mib"),
    ("temperature.gpu", "temp_c", "float"),
    ("power.draw", "power_w", "float"),
    ("power.limit", "power_limit_w", "float"),
    ("name", "name", "str"),
)
APP_FIELDS: Tuple[Tuple[str, str, str], ...] = (
    ("gpu_uuid", "gpu_uuid", "str"),
    ("pid", "pid", "int"),
    ("used_memory", "mem_used", "mib"),
    ("process_name", "process_name", "str"),
)


def gpu_argv(binary: str = "nvidia-smi") -> List[str]:
    return [binary, "--query-gpu=" + ",".join(f[0] for f in GPU_FIELDS),
            "--format=csv,noheader,nounits"]


def apps_argv(binary: str = "nvidia-smi") -> List[str]:
    return [binary, "--query-compute-apps=" + ",".join(f[0] for f in APP_FIELDS),
            "--format=csv,noheader,nounits"]


def _value(text: str, kind: str) -> Any:
    text = text.strip()
    # "[N/A]", "[Not Supported]", "[Insufficient Permissions]", "[Unknown Error]", ...
    if not text or text.startswith("[") or text.upper() in ("N/A", "NOT SUPPORTED"):
        return None
    if kind == "str":
        return text
    try:
        number = float(text)
    except ValueError:
        return None
    if kind == "int":
        return int(number)
    if kind == "mib":
        return int(number * MIB)
    return number


def _rows(text: str, fields: Tuple[Tuple[str, str, str], ...], key: str
          ) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Parsed rows, and the lines that were not rows (nvidia-smi's own messages).

    A row without ``key`` (a garbled line) is not a row: it goes with the other lines, after
    them.
    """
    rows: List[Dict[str, Any]] = []
    other: List[str] = []
    unkeyed: List[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.split(",", len(fields) - 1)  # the last field keeps any comma it has
        if len(parts) != len(fields):
            other.append(line[:300])
            continue
        row = {fields[i][1]: _value(part, fields[i][2]) for i, part in enumerate(parts)}
        if row[key] is None:
            unkeyed.append("unparsed: %s" % row)
        else:
            rows.append(row)
    return rows, other + unkeyed


def parse_gpus(text: str) -> Tuple[List[Dict[str, Any]], List[str]]:
    """``--query-gpu`` output as one dict per GPU (memory in bytes), and any other lines.

    A row without an index (a garbled line) is not a GPU and goes with the other lines.
    """
    return _rows(text, GPU_FIELDS, "index")


def parse_apps(text: str) -> Tuple[List[Dict[str, Any]], List[str]]:
    """``--query-compute-apps`` output as one dict per (process, GPU), and any other lines.

    ``mem_used`` is None where the driver does not say (MIG devices, some containers); a row
    without a pid goes with the other lines.
    """
    return _rows(text, APP_FIELDS, "pid")


def summarise(gpus: List[Dict[str, Any]], apps: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The GPUs with each process's GPU index attached (by uuid), as ``resources`` reports
    them; a process on an unknown uuid (a MIG instance, say) keeps ``gpu_index`` None."""
    by_uuid = {g["uuid"]: g["index"] for g in gpus if g.get("uuid")}
    processes = []
    for app in apps:
        entry = dict(app)
        entry["gpu_index"] = by_uuid.get(app.get("gpu_uuid") or "")
        processes.append(entry)
    return {"devices": gpus, "processes": processes}


def memory_percent(gpu: Dict[str, Any]) -> Optional[float]:
    used, total = gpu.get("mem_used"), gpu.get("mem_total")
    if used is None or not total:
        return None
    return 100.0 * used / total
