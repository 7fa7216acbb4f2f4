"""Host facts for ``env_snapshot``: python, platform, CUDA variables, GPUs, packages."""

import os
import platform
import shutil
import subprocess
import sys
from typing import Any, Dict, List

from .supervisor import Request, Supervisor
from .wire import Op, arg

_CUDA_PREFIXES = ("CUDA", "NVIDIA", "LD_LIBRARY_PATH", "PYTORCH", "TORCH", "XLA", "TPU")


def _run(argv: List[str], timeout: float) -> Dict[str, Any]:
    if shutil.which(argv[0]) is None:
        return {"available": False, "command": " ".join(argv)}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return {
            "available": True,
            "command": " ".join(argv),
            "returncode": proc.returncode,
            "stdout": proc.stdout[-20000:],
            "stderr": proc.stderr[-4000:],
        }
    except subprocess.TimeoutExpired:
        return {"available": True, "command": " ".join(argv), "error": "timed out"}
    except OSError as exc:
        return {"available": True, "command": " ".join(argv), "error": str(exc)}


_TORCH_PROBE = (
    "import json, torch\n"
    "d = {'version': torch.__version__, 'cuda': torch.version.cuda,"
    " 'cuda_available': torch.cuda.is_available(),"
    " 'device_count': torch.cuda.device_count() if torch.cuda.is_available() else 0}\n"
    "d['devices'] = [torch.cuda.get_device_name(i) for i in range(d['device_count'])]\n"
    "print(json.dumps(d))\n"
)


def _torch(timeout: float) -> Dict[str, Any]:
    # In a subprocess: importing torch into the supervisor kernel would cost it a GB of RAM.
    import json

    try:
        proc = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"importable": None, "error": "timed out"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["import failed"])[-1]
        return {"importable": False, "error": last[-500:]}
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"importable": True, "error": "unreadable probe output"}
    info["importable"] = True
    return info


def snapshot(root_dir: str, timeout: float = 60.0) -> Dict[str, Any]:
    per = max(5.0, timeout / 4)
    return {
        "python": sys.version,
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cwd": os.getcwd(),
        "root_dir": root_dir,
        "cuda_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_CUDA_PREFIXES)},
        "nvidia_smi": _run(["nvidia-smi"], per),
        "nvidia_smi_list": _run(["nvidia-smi", "-L"], per),
        "nvcc": _run(["nvcc", "--version"], per),
        "pip_freeze": _run([sys.executable, "-m", "pip", "freeze"], per),
        "torch": _torch(per),
    }


def register(supervisor: Supervisor) -> None:
    def op_env_snapshot(req: Request) -> Dict[str, Any]:
        timeout = float(arg(req.args, "timeout", float, 60.0))
        return snapshot(supervisor.root_dir, timeout)

    supervisor.register(Op.ENV_SNAPSHOT, op_env_snapshot, blocking=True)
