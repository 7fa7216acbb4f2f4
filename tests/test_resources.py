"""Resources: the nvidia-smi parser on recorded outputs, why jobs die, and the usage that job
status, ``resources`` and a job's notebook repr show, on real processes (in-process
supervisor; the MCP tools and ``jupyter-tether top``: test_resources_faces.py).

No GPU here: the end-to-end GPU path runs a stand-in ``nvidia-smi`` (a shell script that
prints the recorded outputs) on PATH. The real binary on a real card is not tested here.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from jupyter_tether.agent_payload import gpu, job_reason, resources
from jupyter_tether.controller.blocking_services import Job
from jupyter_tether.controller.jobs import AsyncJob, JobInfo
from jupyter_tether.formatting import (
    compact_resources,
    compact_usage,
    readable_resources,
    usage_line,
)
from jupyter_tether.mcp_server.tools.common import job_dict
from jupyter_tether.mcp_server.tools.jobs import _follow_once

from .inprocess import InProcess, Services, remote_fixture, services_fixture, until

__all__ = ["remote_fixture", "services_fixture"]

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia_smi"
PY = shlex.quote(sys.executable)
MIB = 1024 * 1024


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- the nvidia-smi parser, on recorded outputs ---------------------------------------------


def test_t4_idle_and_h100_idle() -> None:
    gpus, other = gpu.parse_gpus(fixture("t4_idle.gpu.csv"))
    assert other == []
    assert gpus == [{"index": 0, "uuid": "GPU-3f8c4a26-7c1e-5b4d-a0e2-9d6b1f2c8e47",
                     "util": 0.0, "mem_util": 0.0, "mem_used": 0, "mem_total": 15360 * MIB,
                     "temp_c": 37.0, "power_w": 9.25, "power_limit_w": 70.0,
                     "name": "Tesla T4"}]
    assert gpu.parse_apps(fixture("t4_idle.apps.csv")) == ([], [])  # no process: no lines
    (h100,), _ = gpu.parse_gpus(fixture("h100_idle.gpu.csv"))
    assert (h100["name"], h100["mem_total"], h100["power_limit_w"]) == \
        ("NVIDIA H100 80GB HBM3", 81559 * MIB, 700.0)


def test_two_t4s_with_a_training_process() -> None:
    gpus, _ = gpu.parse_gpus(fixture("t4_x2_training.gpu.csv"))
    apps, _ = gpu.parse_apps(fixture("t4_x2_training.apps.csv"))
    summary = gpu.summarise(gpus, apps)
    assert [d["index"] for d in summary["devices"]] == [0, 1]
    assert summary["devices"][0]["util"] == 97.0
    (process,) = summary["processes"]
    assert (process["pid"], process["gpu_index"], process["mem_used"],
            process["process_name"]) == (4242, 0, 11870 * MIB, "/usr/bin/python3")


def test_four_a100s_map_each_process_to_its_gpu() -> None:
    gpus, _ = gpu.parse_gpus(fixture("a100_x4.gpu.csv"))
    apps, _ = gpu.parse_apps(fixture("a100_x4.apps.csv"))
    summary = gpu.summarise(gpus, apps)
    assert len(summary["devices"]) == 4
    assert {d["name"] for d in summary["devices"]} == {"NVIDIA A100-SXM4-80GB"}
    assert [(p["pid"], p["gpu_index"]) for p in summary["processes"]] == [(31337, 0), (31338, 1)]


def test_mig_and_unsupported_fields_are_none_never_zero() -> None:
    (mig,), _ = gpu.parse_gpus(fixture("a100_mig.gpu.csv"))
    assert mig["util"] is None and mig["mem_util"] is None  # [N/A] in MIG mode
    assert mig["mem_used"] == 36537 * MIB and mig["power_w"] == 87.12
    apps, _ = gpu.parse_apps(fixture("a100_mig.apps.csv"))
    assert [(a["pid"], a["mem_used"]) for a in apps] == [(2811, None), (2954, None)]
    (laptop,), _ = gpu.parse_gpus(fixture("laptop_not_supported.gpu.csv"))
    assert laptop["power_w"] is None and laptop["power_limit_w"] is None
    assert laptop["name"] == "NVIDIA GeForce RTX 3060 Laptop GPU"
    apps, _ = gpu.parse_apps(fixture("laptop_not_supported.apps.csv"))
    # The process name is asked last: a comma in it shifts no field.
    assert apps[1]["process_name"] == "/home/me/venv/bin/python -u train.py --name a,b"
    assert apps[1]["mem_used"] == 260 * MIB


def test_nvidia_smi_messages_are_not_gpus() -> None:
    gpus, other = gpu.parse_gpus(fixture("driver_failed.txt"))
    assert gpus == [] and "couldn't communicate with the NVIDIA driver" in other[0]
    gpus, other = gpu.parse_gpus(fixture("no_devices.txt"))
    assert gpus == [] and other == ["No devices were found"]


def test_rows_without_their_key_go_with_the_other_lines_after_them() -> None:
    gpus, other = gpu.parse_gpus("[N/A], GPU-x, 1, 2, 3, 4, 5, 6, 7, Tesla T4\nhello\n")
    assert gpus == [] and other[0] == "hello" and other[1].startswith("unparsed: {'index'")
    apps, other = gpu.parse_apps("GPU-x, [N/A], 100, python\n")
    assert apps == [] and len(other) == 1 and other[0].startswith("unparsed: ")


# --- warnings ---------------------------------------------------------------------------------


def test_warnings_for_ram_disk_and_gpu_memory() -> None:
    host = {"mem_total": 16 * 2**30, "mem_available": 2**29,
            "disks": [{"path": "/work", "total": 10 * 2**30, "free": 300 * MIB},
                      {"path": "/tmp", "total": 10 * 2**30, "free": 5 * 2**30}]}
    gpus, _ = gpu.parse_gpus(fixture("p100_full.gpu.csv"))  # 15926 of 16384 MiB: 97%
    found = resources.warnings_for(host, {"devices": gpus})
    assert found == ["RAM nearly full: 0.5 GiB of 16.0 GiB available",
                     "disk nearly full: 300 MiB free on /work",
                     "GPU 0 memory 97% used (15.6 GiB of 16.0 GiB)"]
    fine = {"mem_total": 16 * 2**30, "mem_available": 8 * 2**30,
            "disks": [{"path": "/", "total": 10 * 2**30, "free": 5 * 2**30}]}
    idle, _ = gpu.parse_gpus(fixture("a100_x4.gpu.csv"))
    assert resources.warnings_for(fine, {"devices": idle}) == []


def test_cgroup_limits_count_where_tighter(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    v1.mkdir()
    (v2 / "memory.max").write_text("4294967296\n")
    (v2 / "memory.current").write_text("3221225472\n")
    (v2 / "memory.stat").write_text("anon 1\ninactive_file 1073741824\n")
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert resources.cgroup_memory([(str(v2), 2), (str(v1), 1)]) == \
        {"limit": 4 * 2**30, "used": 2 * 2**30}
    assert resources.cgroup_memory([(str(v1), 1)]) is None


# --- why a job died: the classifier -------------------------------------------------------------


def test_reasons_from_exit_kill_and_log() -> None:
    classify = job_reason.classify
    gib = 2**30
    assert classify("exited", {"exit_code": 0}, None, "") is None
    assert classify("running", None, None, "") is None
    oom = classify("killed", {"exit_code": -9, "signal": 9}, None, "", 15 * gib, 16 * gib)
    assert oom is not None and oom["kind"] == "oom_killed" and "16384 MiB RAM" in oom["message"]
    # bash reports a SIGKILLed child as 137 and prints "Killed".
    sigkill = classify("exited", {"exit_code": 137}, None, "bash: line 1: 77 Killed", gib,
                       16 * gib)
    assert sigkill is not None and sigkill["kind"] == "sigkill"
    assert "out-of-memory killer" in sigkill["hint"]
    cuda = classify("exited", {"exit_code": 1}, None, "Traceback (most recent call last):\n"
                    "  File \"t.py\", line 3\ntorch.OutOfMemoryError: CUDA out of memory. Tried "
                    "to allocate 2.00 GiB\n")
    assert cuda is not None and cuda["kind"] == "cuda_out_of_memory"
    assert cuda["message"].startswith("torch.OutOfMemoryError: CUDA out of memory")
    ranked = classify("exited", {"exit_code": 1}, None,
                      "step 3\n[rank0]: Traceback (most recent call last):\n"
                      "[rank0]:   File \"train.py\", line 9, in <module>\n"
                      "[rank0]:     run()\n[rank0]: KeyError: 'labels'\nteardown\n")
    assert ranked == {"kind": "traceback", "message": "KeyError: 'labels'",
                      "hint": job_reason.HINTS["traceback"]}
    killed = classify("killed", {"exit_code": -15, "signal": 15}, {"signal": 15, "by": "user"},
                      "")
    assert killed is not None and killed["kind"] == "killed_by_user"
    timed = classify("killed", {"exit_code": -15, "signal": 15}, {"signal": 15,
                                                                   "by": "timeout"}, "")
    assert timed is not None and timed["kind"] == "timeout"
    gnu_timeout = classify("exited", {"exit_code": 124}, None, "")
    assert gnu_timeout is not None and gnu_timeout["kind"] == "timeout"
    segv = classify("killed", {"exit_code": -11, "signal": 11}, None, "loading\n")
    assert segv is not None and segv["kind"] == "crashed" and "SIGSEGV" in segv["message"]
    lost = classify("lost", None, None, "")
    assert lost is not None and lost["kind"] == "lost"
    plain = classify("exited", {"exit_code": 3}, None, "working\nno input files\n\n")
    assert plain is not None and plain["message"] == "exited with code 3: no input files"
    bad_alloc = classify("killed", {"exit_code": -6, "signal": 6}, None,
                         "terminate called after throwing an instance of 'std::bad_alloc'\n")
    assert bad_alloc is not None and bad_alloc["kind"] == "out_of_memory"


# --- real jobs in-process: usage and reasons --------------------------------------------------


def _start(remote: InProcess, command: str) -> dict[str, Any]:
    result: dict[str, Any] = remote.ok("job_start", {"command": command})
    return result


def _wait(remote: InProcess, job_id: str) -> dict[str, Any]:
    done: dict[str, Any] = remote.ok("job_wait", {"job_id": job_id, "timeout": 60},
                                     timeout=70)
    assert done["state"] != "running", done
    return done


ALLOC = ("import os, time\nblock = b'x' * (300 * 1024 * 1024)\nopen('ready', 'w').close()\n"
         "while not os.path.exists('go'):\n    time.sleep(0.05)\n")


def test_a_job_allocating_300_mb_shows_its_peak(remote: InProcess) -> None:
    (remote.root / "alloc.py").write_text(ALLOC)
    # The allocation runs in a child of the job's shell: the usage covers the whole group.
    job = _start(remote, f"sleep 0.01; {PY} alloc.py; echo done")
    until(lambda: (remote.root / "ready").exists(), 30)
    status = remote.ok("job_status", {"job_id": job["job_id"]})
    usage = status["usage"]
    assert usage["rss"] >= 300 * MIB and usage["rss_peak"] >= usage["rss"]
    assert usage["procs"] >= 2 and usage["threads"] >= 2 and usage["open_files"] >= 3
    assert usage["cpu_percent"] is not None and usage["cpu_percent"] >= 0
    listed = remote.ok("resources", {"gpus": False})
    (row,) = [j for j in listed["jobs"] if j["job_id"] == job["job_id"]]
    assert row["usage"]["rss"] >= 300 * MIB
    (remote.root / "go").touch()
    done = _wait(remote, job["job_id"])
    assert done["exit_code"] == 0 and "reason" not in done
    # The wrapper's getrusage of the reaped tree: the peak is known after the end too.
    assert done["usage"]["rss_peak"] >= 300 * MIB and done["usage"]["cpu_s"] > 0


def test_a_memory_limited_job_gets_an_oom_like_reason(remote: InProcess) -> None:
    job = _start(remote, f"ulimit -v 500000; {PY} -c 'x = bytearray(2 * 1024 ** 3)'")
    done = _wait(remote, job["job_id"])
    assert done["exit_code"] == 1
    assert done["reason"]["kind"] == "out_of_memory"
    assert done["reason"]["message"] == "MemoryError"
    assert "memory" in done["reason"]["hint"]


def test_a_traceback_gets_its_last_line_and_others_their_reason(remote: InProcess) -> None:
    script = "def f():\n    raise ValueError('shapes (3, 4) and (5,) not aligned')\nf()\n"
    (remote.root / "fail.py").write_text(script)
    failed = _wait(remote, _start(remote, f"echo starting; {PY} fail.py")["job_id"])
    assert failed["reason"]["kind"] == "traceback"
    assert failed["reason"]["message"] == "ValueError: shapes (3, 4) and (5,) not aligned"
    missing = _wait(remote, _start(remote, "no-such-program-xyz --epochs 3")["job_id"])
    assert missing["exit_code"] == 127 and missing["reason"]["kind"] == "command_not_found"
    assert "no-such-program-xyz" in missing["reason"]["message"]
    sleeper = _start(remote, "sleep 60")
    killed = remote.ok("job_kill", {"job_id": sleeper["job_id"], "grace": 5})
    assert killed["state"] == "killed" and killed["reason"]["kind"] == "killed_by_user"
    slow = _start(remote, "sleep 60")
    remote.fails("invalid_argument", "job_kill", {"job_id": slow["job_id"], "reason": "bored"})
    timed = anyio.run(functools.partial(AsyncJob(remote, slow["job_id"]).kill, grace=5,
                                        reason="timeout"))
    assert timed.reason is not None and timed.reason["kind"] == "timeout"
    # A SIGKILL from outside (not a kill request): the OOM killer's signature, or kill -9.
    outside = _wait(remote, _start(remote, "kill -9 $$")["job_id"])
    assert outside["reason"]["kind"] in ("sigkill", "oom_killed")
    assert outside["signal"] == signal.SIGKILL


def test_no_nvidia_smi_is_said_without_an_error(remote: InProcess,
                                                monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = remote.ok("resources", {})
    assert result["gpus"] == {"available": False, "note": resources.NO_NVIDIA_SMI}
    assert result["host"]["mem_total"] > 0 and result["host"]["cpu_count"] >= 1
    assert [d["path"] for d in result["host"]["disks"]] == [str(remote.root), "/tmp"]
    assert result["warnings"] == [] or all(isinstance(w, str) for w in result["warnings"])


def _fake_nvidia_smi(folder: Path, gpu_csv: str, apps_csv: str) -> Path:
    """A STAND-IN for NVIDIA's ``nvidia-smi`` (there is no GPU here): prints recorded output
    for exactly the two queries the payload makes, and fails on anything else."""
    folder.mkdir()
    (folder / "gpu.csv").write_text(gpu_csv)
    (folder / "apps.csv").write_text(apps_csv)
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n# STAND-IN for the real nvidia-smi binary, for tests only.\n"
        f"if [ \"$*\" = {shlex.quote(' '.join(gpu.gpu_argv('x')[1:]))} ]; then "
        f"cat {shlex.quote(str(folder / 'gpu.csv'))}; exit 0; fi\n"
        f"if [ \"$*\" = {shlex.quote(' '.join(gpu.apps_argv('x')[1:]))} ]; then "
        f"cat {shlex.quote(str(folder / 'apps.csv'))}; exit 0; fi\n"
        "echo \"fake nvidia-smi: unexpected arguments: $*\" >&2; exit 2\n")
    script.chmod(0o755)
    return folder


def test_gpu_memory_maps_to_its_job_through_a_stand_in_nvidia_smi(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    job = _start(remote, "sleep 60")
    uuid = "GPU-7c2a41e9-38b6-d0f5-9e14-6b3d2a8c0f51"  # the P100 of p100_full.gpu.csv
    apps = f"{uuid}, {job['pid']}, 15900, python\n{uuid}, 999999, 24, /usr/bin/Xorg\n"
    fake = _fake_nvidia_smi(tmp_path / "fake-bin", fixture("p100_full.gpu.csv"), apps)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    try:
        result = remote.ok("resources", {})
        assert "error" not in result["gpus"], result["gpus"]
        (device,) = result["gpus"]["devices"]
        assert device["name"] == "Tesla P100-PCIE-16GB" and device["util"] == 100.0
        owners = {p["pid"]: p["job_id"] for p in result["gpus"]["processes"]}
        assert owners == {job["pid"]: job["job_id"], 999999: None}
        (row,) = [j for j in result["jobs"] if j["job_id"] == job["job_id"]]
        assert row["usage"]["gpu_mem"] == 15900 * MIB and row["usage"]["gpus"] == [0]
        assert any(w.startswith("GPU 0 memory 97% used") for w in result["warnings"])
        status = remote.ok("job_status", {"job_id": job["job_id"]})
        assert status["usage"]["gpu_mem"] == 15900 * MIB
        assert any("GPU 0 memory" in w for w in status["warnings"])
        # jupyter_job_follow's result carries the warning too.
        followed = anyio.run(_follow_once, AsyncJob(remote, job["job_id"]), 0, 0.0, 1000)
        assert any("GPU 0 memory" in w for w in followed["warnings"])
    finally:
        remote.ok("job_kill", {"job_id": job["job_id"], "signal": 9})


def test_sampling_runs_only_while_someone_watches(remote: InProcess) -> None:
    first = remote.ok("resources", {"gpus": False, "watch_s": 1.0})
    assert first["sampler"]["active"] is True
    stopped = until(lambda: (lambda r: r if not r["sampler"]["active"] else None)(
        remote.ok("resources", {"gpus": False, "watch_s": 0})), 15)
    samples = stopped["sampler"]["samples"]
    time.sleep(1.5)  # no lease: no sample runs meanwhile
    after = remote.ok("resources", {"gpus": False, "watch_s": 0})
    assert after["sampler"]["samples"] <= samples + 1  # only the one this call asked for
    assert after["sampler"]["active"] is False


# --- the faces ------------------------------------------------------------------------------


def test_compact_forms_and_the_usage_line() -> None:
    running = {"cpu_percent": 97.6, "cpu_s": 12.0, "rss": 312 * MIB, "rss_peak": 400 * MIB,
               "threads": 9, "procs": 2, "open_files": 30, "gpu_mem": 2048 * MIB, "gpus": [0]}
    assert compact_usage(running) == {"cpu_pct": 97.6, "rss_mb": 312, "peak_mb": 400,
                                      "gpu_mb": 2048}
    assert usage_line(running) == "CPU 98% · RSS 312 MiB (peak 400 MiB) · GPU 2.0 GiB"
    ended = {"rss_peak": 320 * MIB, "cpu_s": 4.25}
    reason = {"kind": "traceback", "message": "KeyError: 'x'", "hint": "..."}
    assert usage_line(ended, reason) == "CPU 4.2s · peak RSS 320 MiB · traceback: KeyError: 'x'"
    info = JobInfo.from_wire({"job_id": "j1", "state": "exited", "exit_code": 1,
                              "usage": ended, "reason": reason, "bytes_written": 3})
    shown = job_dict(info)
    assert shown["usage"] == {"peak_mb": 320, "cpu_s": 4.25} and shown["reason"] == reason
    res = {"host": {"mem_total": 16 * 2**30, "mem_available": 4 * 2**30, "load": [1.5, 1, 1],
                    "cpu_count": 8, "disks": [{"path": "/", "free": 2**31, "total": 2**33}]},
           "gpus": {"available": False, "note": resources.NO_NVIDIA_SMI}, "warnings": []}
    assert compact_resources(res) == {"ram_gb": 16.0, "ram_available_pct": 25.0, "load1": 1.5,
                                      "cpus": 8, "disk_free_gb": {"/": 2.0},
                                      "gpus": resources.NO_NVIDIA_SMI}
    assert readable_resources(res)["gpus"] == {"available": False,
                                               "note": resources.NO_NVIDIA_SMI}


def test_a_job_in_a_notebook_shows_a_usage_line(services: Services) -> None:
    (services.root / "alloc.py").write_text(ALLOC)
    job = Job(services.portal, services.run(services.jobs.start, f"{PY} alloc.py"))
    until(lambda: (services.root / "ready").exists(), 30)
    html = job._repr_html_()
    assert "CPU " in html and "RSS 3" in html and "MiB" in html, html
    assert "RSS" in repr(job)
    (services.root / "go").touch()
    job.wait(60)
    assert "peak RSS" in job._repr_html_()
    (services.root / "fail.py").write_text("raise KeyError('labels')\n")
    failed = Job(services.portal, services.run(services.jobs.start, f"{PY} fail.py"))
    failed.wait(60)
    assert "traceback: KeyError: &#x27;labels&#x27;" in failed._repr_html_()
    assert "traceback: KeyError: 'labels'" in repr(failed)
