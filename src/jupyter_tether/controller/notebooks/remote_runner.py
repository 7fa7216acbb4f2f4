"""Run a notebook in its own kernel and write it back after every cell (jupyter-tether).

``jupyter-tether nb start`` uploads this file to the Jupyter host and starts it as a job:
``python remote_runner.py SPEC.json``. It uses only the standard library and jupyter_client
(every Jupyter host has both) and runs on Python >= 3.9. SPEC holds ``notebook``,
``output``, ``parameters``, ``kernel_name``, ``cell_timeout`` and ``allow_errors``.

Like papermill: the parameters go into a cell tagged ``injected-parameters`` after the one
tagged ``parameters`` (or first), replacing an earlier injected cell; outputs are cleared,
then each code cell runs in order and the output notebook is replaced atomically after each
one. The job's log has one line per cell started and finished, and an error's traceback.
Exit status: 0 all cells ran, 1 a cell failed, 2 the notebook or kernel could not be set
up, 3 stopped by a signal.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_STREAM_CHARS = 1000000
MAX_OUTPUTS = 500
MAX_VALUE_CHARS = 16 * 1024 * 1024
META_KEY = "jupyter_tether"


class Stopped(Exception):
    """A signal asked the job to stop."""


def log(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def tags_of(cell: dict[str, Any]) -> list[Any]:
    metadata = cell.get("metadata")
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return tags if isinstance(tags, list) else []


def text_of(value: Any) -> str:
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return value if isinstance(value, str) else ""


def inject_parameters(nb: dict[str, Any], parameters: dict[str, Any]) -> None:
    """Papermill's convention: a cell tagged injected-parameters after the parameters cell."""
    cells = [c for c in nb["cells"] if "injected-parameters" not in tags_of(c)]
    nb["cells"] = cells
    if not parameters:
        return
    source = "# Parameters\n" + "".join(
        f"{name} = {value!r}\n" for name, value in sorted(parameters.items()))
    cell: dict[str, Any] = {"cell_type": "code", "execution_count": None,
                            "metadata": {"tags": ["injected-parameters"]}, "outputs": [],
                            "source": source}
    if nb.get("nbformat_minor", 0) >= 5:
        cell["id"] = uuid.uuid4().hex[:12]
    at = next((i + 1 for i, c in enumerate(cells) if "parameters" in tags_of(c)), 0)
    cells.insert(at, cell)


def write_atomic(path: str, nb: dict[str, Any]) -> None:
    """Replace ``path`` whole (a reader sees the old file or the new, never half)."""
    text = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    folder, name = os.path.split(os.path.abspath(path))
    # A fresh name, created exclusively and never through a link: the folder may be shared
    # with other users, who could plant a link at a name known in advance.
    tmp = os.path.join(folder, f".{name}.tether-{uuid.uuid4().hex[:16]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    with open(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
    except OSError:
        pass
    os.replace(tmp, path)


class Recorder:
    """A cell's outputs from its iopub messages, as a front end keeps them (bounded)."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []
        self.error: dict[str, Any] | None = None
        self.clear_on_next = False
        self.displays: dict[str, list[dict[str, Any]]] = {}
        self.dropped = 0

    def add(self, output: dict[str, Any]) -> bool:
        if self.clear_on_next:
            self.outputs, self.displays, self.clear_on_next = [], {}, False
        if len(self.outputs) >= MAX_OUTPUTS:
            self.dropped += 1
            return False
        self.outputs.append(output)
        return True

    @staticmethod
    def bundle(data: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for mime, value in (data.items() if isinstance(data, dict) else []):
            if not re.match(r"^application/(.*\+)?json$", str(mime)) and not isinstance(value, str):
                value = text_of(value) if isinstance(value, list) else json.dumps(value, default=str)
            if len(value if isinstance(value, str) else json.dumps(value, default=str)) \
                    <= MAX_VALUE_CHARS:
                out[str(mime)] = value
        return out or {"text/plain": "[... output too large, not kept ...]"}

    def feed(self, kind: str, content: dict[str, Any]) -> None:
        if kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            text = text_of(content.get("text"))
            last = self.outputs[-1] if self.outputs and not self.clear_on_next else None
            if last is not None and last.get("output_type") == "stream" and last["name"] == name:
                last["text"] = (last["text"] + text)[-MAX_STREAM_CHARS:]
            else:
                self.add({"output_type": "stream", "name": name, "text": text[-MAX_STREAM_CHARS:]})
        elif kind in ("display_data", "execute_result"):
            metadata = content.get("metadata")
            output: dict[str, Any] = {"output_type": kind, "data": self.bundle(content.get("data")),
                                      "metadata": metadata if isinstance(metadata, dict) else {}}
            if kind == "execute_result":
                count = content.get("execution_count")
                output["execution_count"] = count if isinstance(count, int) else None
            transient = content.get("transient")
            display_id = transient.get("display_id") if isinstance(transient, dict) else None
            if self.add(output) and isinstance(display_id, str):
                self.displays.setdefault(display_id, []).append(output)
        elif kind == "update_display_data":
            transient = content.get("transient")
            display_id = transient.get("display_id") if isinstance(transient, dict) else None
            for output in self.displays.get(str(display_id), []):
                output["data"] = self.bundle(content.get("data"))
        elif kind == "error":
            traceback = content.get("traceback")
            self.error = {"output_type": "error", "ename": str(content.get("ename", "")),
                          "evalue": str(content.get("evalue", "")),
                          "traceback": [str(t) for t in traceback]
                          if isinstance(traceback, list) else []}
            self.add(self.error)
        elif kind == "clear_output":
            if content.get("wait"):
                self.clear_on_next = True
            else:
                self.outputs, self.displays = [], {}

    def result(self) -> list[dict[str, Any]]:
        if self.dropped:
            note = f"[... {self.dropped} more outputs not kept ...]\n"
            return [*self.outputs, {"output_type": "stream", "name": "stderr", "text": note}]
        return self.outputs


def run_cell(km: Any, kc: Any, code: str, timeout: float | None,
             allow_errors: bool) -> tuple[str, int | None, Recorder]:
    """Execute one cell; (status, execution_count, its outputs)."""
    msg_id = kc.execute(code, store_history=True, allow_stdin=False,
                        stop_on_error=not allow_errors)
    recorder = Recorder()
    deadline = None if not timeout else time.monotonic() + timeout
    interrupted = False
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=1.0)
        except queue.Empty:
            if not km.is_alive():
                raise RuntimeError("the kernel died while running the cell") from None
            if deadline is not None and time.monotonic() > deadline and not interrupted:
                log(f"  cell timeout ({timeout}s): interrupting the kernel")
                km.interrupt_kernel()
                interrupted = True
            continue
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "status":
            if content.get("execution_state") == "idle":
                break
            continue
        recorder.feed(kind, content)
    status, count = "ok", None
    while True:
        try:
            reply = kc.get_shell_msg(timeout=30)
        except queue.Empty:
            break
        if reply.get("parent_header", {}).get("msg_id") == msg_id:
            status = str(reply["content"].get("status", "ok"))
            found = reply["content"].get("execution_count")
            count = found if isinstance(found, int) else None
            break
    if status == "error" and recorder.error is None:
        recorder.feed("error", reply["content"])
    return status, count, recorder


def kernel_manager(name: str, sockets: str | None) -> Any:
    """A manager for the notebook's kernel. With ``sockets`` (a private folder), the kernel
    listens on unix sockets there: tcp ports are picked by binding port 0 and letting go, and
    another process on a busy host may take one first (the kernel then dies or hangs), and
    any local user can reach a tcp port, where the folder is ours alone."""
    from jupyter_client.manager import KernelManager

    if sockets is None:
        return KernelManager(kernel_name=name)
    return KernelManager(kernel_name=name, transport="ipc", ip=os.path.join(sockets, "k"))


def _on_signal(signum: int, frame: Any) -> None:
    raise Stopped(f"signal {signum}")


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    source_path, output_path = spec["notebook"], spec.get("output") or spec["notebook"]
    try:
        with open(source_path, encoding="utf-8") as handle:
            nb = json.load(handle)
        if not isinstance(nb, dict) or nb.get("nbformat") != 4 or \
                not isinstance(nb.get("cells"), list) or \
                not all(isinstance(c, dict) for c in nb["cells"]) or \
                not isinstance(nb.setdefault("metadata", {}), dict):
            raise ValueError("not an nbformat 4 notebook")
    except (OSError, ValueError) as exc:
        log(f"[notebook] cannot read {source_path}: {exc}")
        return 2
    inject_parameters(nb, spec.get("parameters") or {})
    code_cells = [c for c in nb["cells"] if c.get("cell_type") == "code"]
    for cell in code_cells:
        cell["outputs"], cell["execution_count"] = [], None
    meta = {"status": "running", "started_at": now_iso(), "cells_total": len(code_cells),
            "cells_done": 0, "parameters": spec.get("parameters") or {}}
    nb.setdefault("metadata", {})[META_KEY] = meta
    write_atomic(output_path, nb)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _on_signal)

    from jupyter_client.kernelspec import NoSuchKernel

    kernelspec = nb["metadata"].get("kernelspec")
    found = kernelspec.get("name") if isinstance(kernelspec, dict) else None
    name = spec.get("kernel_name") or (found if isinstance(found, str) else "") or "python3"
    # mkdtemp: mode 0700, and a short path (a unix socket's has at most 107 bytes).
    sockets = tempfile.mkdtemp(prefix="jt-nb-") if os.name == "posix" else None
    km = kernel_manager(name, sockets)
    kc = None
    code, started = 0, time.monotonic()
    try:
        try:
            km.start_kernel(cwd=os.path.dirname(os.path.abspath(source_path)))
        except NoSuchKernel:
            log(f"[notebook] no kernel named {name!r} here: using python3")
            km = kernel_manager("python3", sockets)
            km.start_kernel(cwd=os.path.dirname(os.path.abspath(source_path)))
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        log(f"[notebook] {source_path}: {len(code_cells)} code cells, kernel {km.kernel_name}")
        total = len(code_cells)
        for number, cell in enumerate(code_cells, 1):
            where = f" id={cell['id']}" if cell.get("id") else ""
            label = f"[cell {number}/{total}{where}]"
            log(f"{label} started")
            began = time.monotonic()
            status, count, recorder = run_cell(km, kc, text_of(cell.get("source")),
                                               spec.get("cell_timeout"), spec.get("allow_errors"))
            cell["outputs"], cell["execution_count"] = recorder.result(), count
            meta["cells_done"] = number
            write_atomic(output_path, nb)
            took = time.monotonic() - began
            if status == "ok":
                log(f"{label} ok in {took:.2f}s")
                continue
            error = recorder.error or {}
            log("{} {} in {:.2f}s: {}: {}".format(label, status, took, error.get("ename", ""),
                                            error.get("evalue", "")))
            for line in error.get("traceback", []):
                log(_ANSI.sub("", line).rstrip("\n"))
            if not spec.get("allow_errors"):
                meta["status"], meta["failed_cell"] = "failed", number
                code = 1
                break
        else:
            meta["status"] = "completed"
    except Stopped as exc:
        meta["status"], code = "stopped", 3
        log(f"[notebook] stopped ({exc})")
    except Exception as exc:
        meta["status"], code = "failed", max(code, 2)
        log(f"[notebook] failed: {type(exc).__name__}: {exc}")
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        meta["ended_at"] = now_iso()
        write_atomic(output_path, nb)
        if kc is not None:
            kc.stop_channels()
        try:
            km.shutdown_kernel(now=True)
        except Exception:
            pass
        if sockets is not None:
            shutil.rmtree(sockets, ignore_errors=True)
    took = time.monotonic() - started
    log(f"[notebook] {meta['status']}: {meta['cells_done']}/{meta['cells_total']} cells in "
        f"{took:.1f}s -> {output_path}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
