"""``submit`` and ``collect``: a job spec (sync, bootstrap, run) and its artifacts."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import anyio

from .. import AsyncTether, Target, validate_job_spec
from ..formatting import human_bytes
from .context import EXIT_ERROR, EXIT_OK, Ctx, UsageError, add_command, error, one_line, unwrap
from .fanout import configured_targets, gather
from .files import report_dry_run
from .jobs import follow_job
from .output import escape, new_table, phase_progress, print_mapping, styled

# --- submit -----------------------------------------------------------------------------------


def add_submit(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "submit", cmd_submit, "submit a job spec (sync, bootstrap, run)",
                    """
        jupyter-tether submit job.yaml
        jupyter-tether submit job.json --follow
        jupyter-tether submit job.yaml --target east --target west   # a job on each
        (with several targets it prints each job id and the collect command for each)
        """, common)
    p.add_argument("spec", help="a .json or .yaml job spec")
    p.add_argument("--follow", action="store_true",
                   help="follow the job's log and exit with its exit status")
    p.add_argument("--dry-run", action="store_true",
                   help="change nothing: show what each sync would send and delete")


def _load_spec(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0]
        raise UsageError(f"{path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {reason}") \
            from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: a job spec must be a mapping (JSON object / YAML dict)")
    return spec


def _collect_dir(name: str) -> str:
    return f"results/{name}"


def cmd_submit(ctx: Ctx) -> int:
    spec = _load_spec(Path(ctx.args.spec))
    if len(ctx.args.targets) > 1:
        if ctx.args.dry_run:
            raise UsageError("--dry-run takes one --target: dry-run the spec on each in turn")
        return _submit_many(ctx, spec)
    tether = ctx.connect()
    with phase_progress(ctx) as progress:
        result = tether.submit(spec, progress=progress, dry_run=ctx.args.dry_run)
    if result.get("dry_run"):
        if ctx.json:
            ctx.emit_json(result)
        else:
            for item in result.get("sync", []):
                report_dry_run(ctx, str(item.get("local_dir")), {**item, "would_refuse": []})
            ctx.note("dry run: nothing was synced, bootstrapped or started")
        for reason in result.get("would_refuse", []):
            error(f"a real submit would refuse: {reason}")
        return EXIT_ERROR if result.get("would_refuse") else EXIT_OK
    job_id = result.get("job_id")
    if ctx.args.follow and job_id:
        if not ctx.json:
            if result.get("reused"):
                ctx.note(f"an identical submit already started job {job_id}: following it")
            ctx.note(f"job {job_id} submitted; Ctrl-C detaches (the job keeps running)")
        return follow_job(ctx, tether.jobs.get(str(job_id)))
    if ctx.json:
        ctx.emit_json(result)
    else:
        print_mapping(ctx, {k: v for k, v in result.items() if k not in ("job", "error")})
        if job_id:
            ctx.note("follow it with: " + ctx.again(f"logs {job_id} -f"))
            if result.get("artifacts"):
                ctx.note("collect its artifacts with: " + ctx.again(f"collect {job_id} results"))
    if not result.get("ok", True):
        error(result.get("error") or "the submit failed")
        return EXIT_ERROR
    return EXIT_OK


def _submit_many(ctx: Ctx, spec: dict[str, Any]) -> int:
    """The same spec to several named targets at once: a job on each, collected from each."""
    args = ctx.args
    if args.url:
        raise UsageError("several --target names and --url do not mix")
    if args.follow:
        raise UsageError("--follow follows one job: with several --target names, follow each "
                         "job with `jupyter-tether --target NAME logs JOB -f`")
    validate_job_spec(spec)  # a bad spec is refused before anything is sent anywhere
    entries = configured_targets(args.targets)

    async def one(entry: tuple[str, Target | None, str | None]) -> dict[str, Any]:
        name, target, problem = entry
        row: dict[str, Any] = {"target": name, "ok": False, "job_id": None, "error": problem}
        if target is None:
            return row
        try:
            async with AsyncTether(target=target) as aio:
                result = await aio.submit(spec)
        except Exception as raised:
            row["error"] = one_line(unwrap(raised), target)
            return row
        job_id = result.get("job_id")
        row.update(ok=bool(result.get("ok", True)) and bool(job_id), job_id=job_id,
                   reused=bool(result.get("reused")), error=result.get("error"), result=result)
        if job_id:
            row["follow"] = f"jupyter-tether --target {shlex.quote(name)} logs {job_id} -f"
            row["collect"] = (f"jupyter-tether --target {shlex.quote(name)} collect {job_id} "
                              f"{shlex.quote(_collect_dir(name))}")
        return row

    ctx.note(f"submitting {args.spec} to {len(entries)} targets: "
             + ", ".join(name for name, _, _ in entries))
    rows: list[dict[str, Any]] = anyio.run(gather, entries, one)
    failed = [row["target"] for row in rows if not row["ok"]]
    if ctx.json:
        ctx.emit_json({"ok": not failed, "submits": rows})
    else:
        table = new_table(ctx, "TARGET", "JOB", "RESULT")
        for row in rows:
            if row["ok"]:
                outcome = "reused (an identical submit)" if row.get("reused") else "started"
                table.add_row(escape(row["target"]), row["job_id"],
                              styled(ctx, outcome, "green"))
            else:
                table.add_row(escape(row["target"]), row["job_id"] or "-",
                              styled(ctx, f"failed: {row['error']}", "red"))
        ctx.table(table)
        started = [row for row in rows if row.get("job_id")]
        if started:
            ctx.note("follow with:\n" + "\n".join(f"  {row['follow']}" for row in started))
            ctx.note("collect the artifacts with:\n"
                     + "\n".join(f"  {row['collect']}" for row in started))
    if failed:
        error(f"the submit failed on {len(failed)} of {len(rows)} targets: {', '.join(failed)}")
        return EXIT_ERROR
    return EXIT_OK


# --- collect ----------------------------------------------------------------------------------


def add_collect(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "collect", cmd_collect, "download a submitted job's artifacts",
                    """
        jupyter-tether collect JOB ./results
        jupyter-tether collect JOB ./results --allow-running
        """, common)
    p.add_argument("job", help="job id")
    p.add_argument("dir", help="local directory")
    p.add_argument("--allow-running", action="store_true",
                   help="collect even though the job has not ended")


def cmd_collect(ctx: Ctx) -> int:
    tether = ctx.connect()
    with phase_progress(ctx) as progress:
        result = tether.collect(ctx.args.job, ctx.args.dir,
                                require_done=not ctx.args.allow_running, progress=progress)
    if ctx.json:
        ctx.emit_json(result)
    else:
        table = new_table(ctx, "ARTIFACT", "LOCAL", "RESULT")
        for item in result.get("downloads", []):
            remote = item.get("remote_path") or item.get("remote_dir") or str(item.get("artifact"))
            local = item.get("local_path") or item.get("local_dir") or "-"
            outcome = (human_bytes(item["bytes"]) if isinstance(item.get("bytes"), int) else "ok") \
                if item.get("ok") else f"failed: {item.get('error')}"
            table.add_row(remote, local, outcome)
        ctx.table(table)
    missing = result.get("missing") or []
    if missing:
        error(f"{len(missing)} artifact(s) could not be collected: "
              + ", ".join(str(m) for m in missing))
        return EXIT_ERROR
    return EXIT_OK
