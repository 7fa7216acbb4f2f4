"""Declarative job specs: ``submit`` (sync + bootstrap + run) and ``collect`` (artifacts).

The spec is the reference tool's (see ``SEED_TOOLS.md``)::

    {"sync": [{"local_dir": "proj", "remote_dir": "proj", "clean_remote": true}],
     "bootstrap": {"cwd": "proj", "commands": ["python -m pip install -e ."]},
     "run": {"cwd": "proj", "command": "python train.py", "log_path": "logs/run.log"},
     "artifacts": ["logs/run.log", {"remote_path": "proj/out/model.pt"},
                   {"remote_dir": "proj/out/plots", "local_subdir": "plots"}]}

What ``submit`` did is written to the remote (``.jupyter_tether/submits/<job_id>.json``),
so ``collect`` works from any controller, after the MCP server or the laptop restarted.

A retried submit never starts the run twice: the job's idempotency key is derived from
the spec and the state of the local directories it syncs, and a submit that repeats one
whose job is still running, or that was made in the last ``REPEAT_WINDOW_S`` seconds,
returns that job. An identical submit after that starts a fresh run; pass
``idempotency_key`` in the spec to pin the behaviour explicitly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from ..agent_payload.paths import check_relpath, is_inside
from ..agent_payload.wire import OpError
from ..errors import ConfigError, JobError, NotFound, TetherError, TransferError
from .caller import Caller
from .files import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SYNC_MAX_BYTES,
    DEFAULT_WINDOW,
    REFERENCE_EXCLUDE_GLOBS_CSV,
    AsyncFiles,
    check_local_name,
    make_dirs_inside,
    safe_local_path,
    scan_local,
)
from .files import DEFAULT_SYNC_EXCLUDES as FILES_DEFAULT_EXCLUDES
from .jobs import AsyncJobs

#: ``progress(phase, done, total)``: a phase name, then bytes (sync) or steps (the others).
SubmitProgress = Callable[[str, int, int], None]

RECORD_DIR = ".jupyter_tether/submits"
REPEAT_WINDOW_S = 600.0
RECORD_VERSION = 1

#: ``exclude_globs_csv``'s default: the reference server's string, verbatim (VCS dirs,
#: caches, venvs, build outputs). It is derived from the one default-exclude table in
#: ``files``; ``split_globs`` reads this exact string as "the default excludes", so a sync
#: with it leaves out what ``files.DEFAULT_SYNC_EXCLUDES`` (the CLI's default) does.
DEFAULT_SYNC_EXCLUDES = REFERENCE_EXCLUDE_GLOBS_CSV

_TOP_KEYS = {"sync", "bootstrap", "run", "artifacts", "server_url", "kernel_id", "name",
             "idempotency_key"}
_SYNC_KEYS = {"local_dir", "remote_dir", "clean_remote", "exclude_globs_csv", "max_bytes",
              "keep_archive", "timeout_s", "allow_root_delete"}
_BOOTSTRAP_KEYS = {"cwd", "commands", "fail_fast", "env_overrides", "timeout_s_per_command",
                   "max_output_chars"}
_RUN_KEYS = {"cwd", "command", "log_path", "env_overrides", "timeout_s", "name"}
_FILE_ARTIFACT_KEYS = {"remote_path", "local_path", "timeout_s"}
_DIR_ARTIFACT_KEYS = {"remote_dir", "local_subdir", "archive_remote_path", "timeout_s"}


def split_globs(csv: str | None) -> list[str]:
    """The reference tool's comma-separated globs as ``files.sync`` exclude patterns.

    The default string (``DEFAULT_SYNC_EXCLUDES``) gives ``files.DEFAULT_SYNC_EXCLUDES``,
    the same excludes as a sync without ``exclude`` (the CLI's), of which the reference's
    globs are a subset. Any other string is taken literally: the reference pruned a
    directory when ``<dir>/**`` matched; in gitignore terms ``X/**`` excludes X's contents
    but not X, so each such glob also excludes the directory itself (``/X/``, anchored at
    the root as the reference's match was).
    """
    if csv is not None and csv.strip() == DEFAULT_SYNC_EXCLUDES:
        return list(FILES_DEFAULT_EXCLUDES)
    patterns: list[str] = []
    for glob in (part.strip() for part in (csv or "").split(",")):
        if not glob:
            continue
        patterns.append(glob)
        if glob.endswith("/**") and len(glob) > 3:
            base = glob[:-3]
            patterns.append(("/" + base if "/" not in base else base) + "/")
    return patterns


# --- validation -------------------------------------------------------------------------------


def _check_keys(obj: dict[str, Any], allowed: set[str], where: str, problems: list[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                        f"(allowed: {', '.join(sorted(allowed))})")


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str,
            problems: list[str]) -> bool:
    # bool is an int subclass: a flag is never a valid count, nor a number a valid flag.
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if not ok:
        problems.append(f"{where} must be {what}, got {type(value).__name__}")
    return ok


def _check_env(value: Any, where: str, problems: list[str]) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int | float) for k, v in value.items()):
        problems.append(f"{where} must be an object of string names to string values")


def _check_local_name(name: str, where: str, problems: list[str]) -> None:
    """An artifact's local name must stay inside collect's ``local_dir``."""
    try:
        check_relpath(name)
    except OpError as exc:
        problems.append(f"{where} {name!r} must be a path relative to collect's local_dir "
                        f"({exc.message})")
        return
    try:
        check_local_name(name)  # what collect would refuse (a leading '~', control chars)
    except TetherError as exc:
        problems.append(f"{where}: {exc}")


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check a job spec and return a normalised copy; ConfigError lists every problem."""
    problems: list[str] = []
    if not isinstance(spec, dict):
        raise ConfigError(f"the job spec must be an object, got {type(spec).__name__}")
    _check_keys(spec, _TOP_KEYS, "spec", problems)
    out: dict[str, Any] = {}

    sync = spec.get("sync") or []
    out["sync"] = []
    if _expect(sync, list, "spec.sync", "a list of {local_dir, remote_dir, ...}", problems):
        for i, entry in enumerate(sync):
            where = f"spec.sync[{i}]"
            if not _expect(entry, dict, where, "an object", problems):
                continue
            _check_keys(entry, _SYNC_KEYS, where, problems)
            item = {
                "local_dir": entry.get("local_dir"), "remote_dir": entry.get("remote_dir"),
                "clean_remote": entry.get("clean_remote", True),
                "exclude_globs_csv": entry.get("exclude_globs_csv", DEFAULT_SYNC_EXCLUDES),
                "max_bytes": entry.get("max_bytes", DEFAULT_SYNC_MAX_BYTES),
                "allow_root_delete": entry.get("allow_root_delete", False),
            }
            for key in ("local_dir", "remote_dir"):
                if not isinstance(item[key], str) or not item[key].strip():
                    problems.append(f"{where}.{key} is required (a non-empty string)")
            _expect(item["clean_remote"], bool, f"{where}.clean_remote", "true or false", problems)
            _expect(item["allow_root_delete"], bool, f"{where}.allow_root_delete",
                    "true or false", problems)
            _expect(item["exclude_globs_csv"], str, f"{where}.exclude_globs_csv",
                    "a comma-separated string of globs", problems)
            _expect(item["max_bytes"], int, f"{where}.max_bytes", "an integer", problems)
            if isinstance(item["local_dir"], str) and item["local_dir"].strip():
                local = Path(item["local_dir"]).expanduser()
                if not local.is_dir():
                    problems.append(f"{where}.local_dir {str(local)!r} is not a local directory")
            out["sync"].append(item)

    bootstrap = spec.get("bootstrap")
    out["bootstrap"] = None
    if bootstrap is not None and _expect(bootstrap, dict, "spec.bootstrap", "an object",
                                         problems):
        _check_keys(bootstrap, _BOOTSTRAP_KEYS, "spec.bootstrap", problems)
        commands = bootstrap.get("commands") or []
        if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
            problems.append("spec.bootstrap.commands must be a list of strings")
        boot = {
            "cwd": bootstrap.get("cwd", ""), "commands": commands,
            "fail_fast": bootstrap.get("fail_fast", True),
            "env_overrides": bootstrap.get("env_overrides") or None,
            "timeout_s_per_command": bootstrap.get("timeout_s_per_command", 600.0),
            "max_output_chars": bootstrap.get("max_output_chars", 20000),
        }
        _expect(boot["cwd"], str, "spec.bootstrap.cwd", "a string", problems)
        _expect(boot["fail_fast"], bool, "spec.bootstrap.fail_fast", "true or false", problems)
        _check_env(boot["env_overrides"], "spec.bootstrap.env_overrides", problems)
        _expect(boot["timeout_s_per_command"], (int, float), "spec.bootstrap.timeout_s_per_command",
                "a number of seconds", problems)
        _expect(boot["max_output_chars"], int, "spec.bootstrap.max_output_chars", "an integer",
                problems)
        out["bootstrap"] = boot

    run = spec.get("run")
    if run is None:
        problems.append("spec.run is required: an object with a 'command' string "
                        "(and optional cwd, log_path, env_overrides)")
        out["run"] = {}
    elif _expect(run, dict, "spec.run", "an object with a 'command' string", problems):
        _check_keys(run, _RUN_KEYS, "spec.run", problems)
        command = run.get("command")
        if not isinstance(command, str) or not command.strip():
            problems.append("spec.run.command is required (a non-empty shell command string)")
        item = {"command": command, "cwd": run.get("cwd", ""),
                "log_path": run.get("log_path") or None,
                "env_overrides": run.get("env_overrides") or None, "name": run.get("name")}
        _expect(item["cwd"], str, "spec.run.cwd", "a string", problems)
        if item["log_path"] is not None:
            _expect(item["log_path"], str, "spec.run.log_path", "a string", problems)
        if item["name"] is not None:
            _expect(item["name"], str, "spec.run.name", "a string", problems)
        _check_env(item["env_overrides"], "spec.run.env_overrides", problems)
        out["run"] = item
    else:
        out["run"] = {}

    artifacts = spec.get("artifacts") or []
    out["artifacts"] = []
    if _expect(artifacts, list, "spec.artifacts", "a list", problems):
        for i, art in enumerate(artifacts):
            where = f"spec.artifacts[{i}]"
            if isinstance(art, str) and art.strip():
                out["artifacts"].append(art)
            elif isinstance(art, dict) and "remote_dir" in art:
                _check_keys(art, _DIR_ARTIFACT_KEYS, where, problems)
                if not isinstance(art["remote_dir"], str) or not art["remote_dir"].strip():
                    problems.append(f"{where}.remote_dir must be a non-empty string")
                sub = art.get("local_subdir", "artifact_dir")
                if not isinstance(sub, str) or not sub.strip():
                    problems.append(f"{where}.local_subdir must be a non-empty string")
                else:
                    _check_local_name(sub, f"{where}.local_subdir", problems)
                out["artifacts"].append({"remote_dir": art["remote_dir"], "local_subdir": sub})
            elif isinstance(art, dict) and "remote_path" in art:
                _check_keys(art, _FILE_ARTIFACT_KEYS, where, problems)
                if not isinstance(art["remote_path"], str) or not art["remote_path"].strip():
                    problems.append(f"{where}.remote_path must be a non-empty string")
                item = {"remote_path": art["remote_path"]}
                if art.get("local_path") is not None and _expect(
                        art["local_path"], str, f"{where}.local_path", "a string", problems):
                    if art["local_path"]:  # "" means the default: the remote basename
                        _check_local_name(art["local_path"], f"{where}.local_path", problems)
                    item["local_path"] = art["local_path"]
                out["artifacts"].append(item)
            else:
                problems.append(f"{where} must be a remote file path string, "
                                "{\"remote_path\": ...} or {\"remote_dir\": ..., \"local_subdir\": ...}")

    for key in ("server_url", "kernel_id", "name", "idempotency_key"):
        value = spec.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"spec.{key} must be a string")
        out[key] = value
    if problems:
        raise ConfigError("invalid job spec: " + "; ".join(problems))
    return out


# --- keys and records -------------------------------------------------------------------------


def _fingerprint_dir(local_dir: str, patterns: list[str]) -> str:
    """A cheap fingerprint of what ``sync`` would send (paths, sizes, mtimes).

    The tree is walked as ``files.sync`` walks it, with the same excludes (and
    ``.gitignore`` files): it changes when synced sources do, and only then.
    """
    tree = scan_local(Path(local_dir).expanduser(), patterns)
    digest = hashlib.sha256()
    for rel in sorted(tree.files):
        st = tree.files[rel].st
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n"
                      .encode(errors="surrogateescape"))
    for problem in sorted(e["path"] for e in tree.errors):
        digest.update(f"unreadable\0{problem}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def derive_key(spec: dict[str, Any]) -> str:
    """The idempotency key of a validated spec: its content plus the synced sources' state."""
    material = {k: spec[k] for k in ("sync", "bootstrap", "run", "artifacts", "name")}
    material["trees"] = [_fingerprint_dir(item["local_dir"], split_globs(item["exclude_globs_csv"]))
                         for item in spec["sync"]]
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return "submit-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def record_path(job_id: str) -> str:
    return f"{RECORD_DIR}/{job_id}.json"


def _key_path(key: str) -> str:
    safe = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"{RECORD_DIR}/key-{safe}.json"


def _redacted_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as stored on the remote: environment values (often secrets) left out."""
    stored = copy.deepcopy(spec)
    for section in (stored.get("bootstrap"), stored.get("run")):
        if section and section.get("env_overrides"):
            section["env_overrides"] = {k: "***" for k in section["env_overrides"]}
    return stored


def _emit(progress: SubmitProgress | None, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(phase, done, total)


def _env(values: dict[str, Any] | None) -> dict[str, str] | None:
    return {str(k): str(v) for k, v in values.items()} if values else None


def _plan_artifact(base: Path, art: Any) -> tuple[str, str, Path]:
    """``(kind, remote, local)`` of one recorded artifact; TransferError if it is refused.

    The record comes from the remote, so its local names are not trusted: every local
    target goes through ``files.safe_local_path`` (no absolute paths, no ``..``, no ``~``
    or control characters, nothing through a link that leads outside ``base``). ``base`` is
    absolute and names are never expanded, so what is planned is where bytes land.
    """
    if isinstance(art, str):
        kind, remote, rel = "file", art, None
    elif isinstance(art, dict) and "remote_dir" in art:
        kind, remote, rel = "dir", art["remote_dir"], art.get("local_subdir", "artifact_dir")
    elif isinstance(art, dict) and "remote_path" in art:
        kind, remote, rel = "file", art["remote_path"], art.get("local_path")
    else:
        raise TransferError(f"artifact {art!r} is neither a remote path, {{remote_path: ...}} "
                            "nor {remote_dir: ...}")
    if not isinstance(remote, str) or not remote.strip():
        raise TransferError(f"artifact {art!r}: the remote path must be a non-empty string")
    if kind == "file" and not rel:
        rel = posixpath.basename(remote.rstrip("/"))
    if not isinstance(rel, str):
        raise TransferError(f"artifact {art!r}: the local name must be a string")
    local = safe_local_path(base, rel)
    if kind == "dir" and os.path.islink(local) and not is_inside(os.path.realpath(local),
                                                                 os.path.realpath(base)):
        raise TransferError(f"refusing local directory {local}: it is a link leading "
                            f"outside {base}")
    return kind, remote, local


# --- submit and collect -----------------------------------------------------------------------


class Submits:
    """``submit`` and ``collect`` on one remote, through its files and jobs services.

    ``AsyncTether.submit``/``collect`` are the face; here they need only a ``Caller`` and the
    two services on it.
    """

    def __init__(self, caller: Caller, files: AsyncFiles, jobs: AsyncJobs) -> None:
        self._caller = caller
        self._files = files
        self._jobs = jobs

    async def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            text = await self._files.read_text(path)
        except NotFound:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    async def load_record(self, job_id: str) -> dict[str, Any]:
        """The submit record of ``job_id``; NotFound (with what to do) if it has none."""
        record = await self._read_json(record_path(job_id))
        if record is None:
            raise NotFound("not_found",
                           f"job {job_id} has no submit record at {record_path(job_id)} on "
                           f"{self._caller.where}: it was not started by a job submit, so "
                           "it has no artifact list; download its files one by one instead")
        return record

    async def submit(self, spec: dict[str, Any], *,
                     progress: SubmitProgress | None = None,
                     dry_run: bool = False) -> dict[str, Any]:
        """Sync, bootstrap, start the run as a background job; returns as soon as it started.

        The result names the job (``job_id``, ``job``), the ``sync`` and ``bootstrap`` results
        and the ``artifacts`` that ``collect`` downloads. When a bootstrap command fails the run
        is not started: ``ok`` is false and ``error`` says which command. ``dry_run`` changes
        nothing: it reports what each sync would upload and delete, and runs nothing.
        """
        norm = validate_spec(spec)
        if dry_run:
            return await self._dry_run(norm)
        explicit_key = norm["idempotency_key"]
        # Walking the local trees is blocking file I/O: keep it off the event loop.
        derived = explicit_key or await anyio.to_thread.run_sync(derive_key, norm)
        index = await self._read_json(_key_path(derived))
        attempt = 0
        if index is not None and isinstance(index.get("job_id"), str):
            previous = index["job_id"]
            attempt = int(index.get("attempt", 0))
            try:
                info = await self._jobs.get(previous).status()
            except NotFound:
                info = None
            recent = time.time() - float(index.get("submitted_at", 0)) < REPEAT_WINDOW_S
            if info is not None and (explicit_key or info.state == "running" or recent):
                record = await self._read_json(record_path(previous)) or {}
                return {
                    "ok": True, "reused": True, "job_id": previous, "job": info.to_dict(),
                    "idempotency_key": index.get("idempotency_key", derived),
                    "sync": record.get("sync", []), "bootstrap": record.get("bootstrap"),
                    "artifacts": record.get("artifacts", norm["artifacts"]),
                    "log_path": info.log_path, "record_path": record_path(previous),
                    "note": ("an identical submit already started this job (same spec and local "
                             "files); it was not started again. Set spec.idempotency_key to a new "
                             "value to force a fresh run."),
                }
            attempt += 1
        job_key = derived if (explicit_key or attempt == 0) else f"{derived}-{attempt}"

        sync_results: list[dict[str, Any]] = []
        for item in norm["sync"]:
            phase = f"sync {item['local_dir']} -> {item['remote_dir']}"
            _emit(progress, phase, 0, 0)

            def on_bytes(done: int, total: int, phase: str = phase) -> None:
                _emit(progress, phase, done, total)

            result = await self._files.sync(
                str(Path(item["local_dir"]).expanduser()), item["remote_dir"],
                exclude=split_globs(item["exclude_globs_csv"]), delete=item["clean_remote"],
                max_bytes=item["max_bytes"], progress=on_bytes,
                allow_root_delete=item["allow_root_delete"])
            sync_results.append({"local_dir": item["local_dir"], "remote_dir": item["remote_dir"],
                                 **result})

        boot_result: dict[str, Any] | None = None
        boot = norm["bootstrap"]
        if boot is not None and boot["commands"]:
            _emit(progress, "bootstrap", 0, len(boot["commands"]))
            boot_result = await self._jobs.run_commands(
                boot["commands"], cwd=boot["cwd"], env=_env(boot["env_overrides"]),
                timeout_per_command=float(boot["timeout_s_per_command"]),
                fail_fast=boot["fail_fast"], max_output_chars=boot["max_output_chars"])
            _emit(progress, "bootstrap", len(boot["commands"]), len(boot["commands"]))
            failed = [r for r in boot_result.get("results", [])
                      if r.get("returncode") != 0 or r.get("timed_out")]
            if failed:
                first = failed[0]
                why = "timed out" if first.get("timed_out") else f"exited with {first.get('returncode')}"
                return {"ok": False, "reused": False, "job_id": None, "job": None,
                        "error": (f"bootstrap command {first.get('command')!r} {why}; the run was "
                                  "not started. Fix it and submit again (see bootstrap.results)."),
                        "sync": sync_results, "bootstrap": boot_result,
                        "artifacts": norm["artifacts"]}

        run = norm["run"]
        _emit(progress, "start", 0, 1)
        job = await self._jobs.start(run["command"], cwd=run["cwd"], env=_env(run["env_overrides"]),
                                      log_path=run["log_path"], name=run["name"] or norm["name"],
                                      idempotency_key=job_key)
        info = job.info or await job.status()
        now = time.time()
        record = {
            "version": RECORD_VERSION, "job_id": job.job_id, "idempotency_key": job_key,
            "attempt": attempt, "submitted_at": now, "target": self._caller.where,
            "spec": _redacted_spec(norm), "artifacts": norm["artifacts"],
            "sync": sync_results, "bootstrap": boot_result, "log_path": info.log_path,
        }
        await self._files.write_text(record_path(job.job_id), json.dumps(record, indent=1))
        await self._files.write_text(_key_path(derived), json.dumps(
            {"job_id": job.job_id, "idempotency_key": job_key, "attempt": attempt,
             "submitted_at": now}))
        _emit(progress, "start", 1, 1)
        return {"ok": True, "reused": False, "job_id": job.job_id, "job": info.to_dict(),
                "idempotency_key": job_key, "sync": sync_results, "bootstrap": boot_result,
                "artifacts": norm["artifacts"], "log_path": info.log_path,
                "record_path": record_path(job.job_id)}

    async def _dry_run(self, norm: dict[str, Any]) -> dict[str, Any]:
        """What ``submit`` would sync (uploads, deletions, refusals); nothing is changed or run."""
        syncs: list[dict[str, Any]] = []
        for item in norm["sync"]:
            result = await self._files.sync(
                str(Path(item["local_dir"]).expanduser()), item["remote_dir"],
                exclude=split_globs(item["exclude_globs_csv"]), delete=item["clean_remote"],
                max_bytes=item["max_bytes"], allow_root_delete=item["allow_root_delete"],
                dry_run=True)
            syncs.append({"local_dir": item["local_dir"], "remote_dir": item["remote_dir"], **result})
        refusals = [r for s in syncs for r in s.get("would_refuse", [])]
        boot = norm["bootstrap"]
        return {"ok": not refusals, "dry_run": True, "job_id": None, "sync": syncs,
                "would_refuse": refusals,
                "bootstrap_commands": boot["commands"] if boot is not None else [],
                "run": norm["run"].get("command"), "artifacts": norm["artifacts"]}

    async def collect(self, job_id: str, local_dir: str | os.PathLike[str], *,
                      require_done: bool = True,
                      progress: SubmitProgress | None = None) -> dict[str, Any]:
        """Download the artifacts a submitted job listed into ``local_dir``.

        Refuses while the job runs if ``require_done``. A missing artifact does not stop the
        others: each download reports ``ok`` and, on failure, ``error``. A file artifact lands
        at its ``local_path``, else at its remote basename; an artifact whose local target is
        refused (absolute, ``..``, outside ``local_dir``) or already taken by an earlier
        artifact of the list is not downloaded and reports why.
        """
        record = await self.load_record(job_id)
        info = await self._jobs.get(job_id).status()
        if require_done and info.state == "running":
            raise JobError(f"job {job_id} is still running; wait for it (job wait) or collect "
                           "with require_done=false to take the artifacts as they are now")
        artifacts = record.get("artifacts", [])
        if not isinstance(artifacts, list):
            raise JobError(f"the submit record {record_path(job_id)} of job {job_id} is damaged: "
                           "its artifacts are not a list")
        # The caller's own argument: expanded once, here; names from the record never are.
        base = Path(os.path.abspath(os.path.expanduser(os.fspath(local_dir))))
        base.mkdir(parents=True, exist_ok=True)
        downloads: list[dict[str, Any]] = []
        taken: dict[Path, Any] = {}  # local target -> the artifact that claimed it
        for art in artifacts:
            item: dict[str, Any]
            try:
                kind, remote, local = _plan_artifact(base, art)
                if local in taken:
                    raise TransferError(
                        f"{remote!r} would land at {local}, where artifact {taken[local]!r} goes "
                        "too; not downloaded rather than overwritten. Give it its own place: "
                        '{"remote_path": ..., "local_path": ...} (or "local_subdir" for a '
                        "directory)")
                taken[local] = art
                if kind == "file":
                    item = {"remote_path": remote, "local_path": str(local)}
                    make_dirs_inside(base, local.parent)
                    safe_local_path(base, os.path.relpath(local, base))  # again, now parents exist
                    phase = f"download {remote}"

                    def on_file(done: int, total: int, phase: str = phase) -> None:
                        _emit(progress, phase, done, total)

                    # The absolute, checked path as it is (the public download() would expand it).
                    result = await self._files._download(
                        remote, local, progress=on_file, chunk_size=DEFAULT_CHUNK_BYTES,
                        window=DEFAULT_WINDOW)
                    item = {**item, **result.to_dict(), "ok": True, "local_path": str(local)}
                else:
                    item = {"remote_dir": remote, "local_dir": str(local)}
                    make_dirs_inside(base, local)  # one level at a time, never through a link out
                    phase = f"download {remote}/"

                    def on_dir(done: int, total: int, phase: str = phase) -> None:
                        _emit(progress, phase, done, total)

                    result_dir = await self._files._download_dir(remote, local, progress=on_dir)
                    item = {**item, **result_dir, "ok": True, "local_dir": str(local)}
            except (TetherError, OSError) as exc:
                item = {"artifact": art, "ok": False, "error": str(exc)}
            downloads.append(item)
        return {"ok": all(d["ok"] for d in downloads), "job_id": job_id, "job": info.to_dict(),
                "local_dir": str(base), "downloads": downloads,
                "missing": [d["artifact"] for d in downloads if not d["ok"]]}
