"""Job specs: default excludes, the idempotency fingerprint, and ``collect``'s local targets
(against an in-process supervisor)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from jupyter_tether.agent_payload.excludes import ExcludeMatcher
from jupyter_tether.controller import files, submit
from jupyter_tether.errors import ConfigError

from .inprocess import Services, services_fixture  # noqa: F401 (the ``services`` fixture)

# The reference server's documented default (SEED_TOOLS.md), written out: not imported.
REFERENCE_CSV = (".git/**,.hg/**,.svn/**,**/__pycache__/**,**/*.pyc,.venv/**,venv/**,build/**,"
                 "dist/**,*.egg-info/**,.mypy_cache/**,.pytest_cache/**,.ruff_cache/**")


# --- default excludes ---------------------------------------------------------------------------


def test_the_default_csv_excludes_what_a_sync_without_exclude_does() -> None:
    assert submit.DEFAULT_SYNC_EXCLUDES == REFERENCE_CSV
    assert submit.split_globs(REFERENCE_CSV) == list(files.DEFAULT_SYNC_EXCLUDES)
    assert submit.split_globs(f"  {REFERENCE_CSV}\n") == list(files.DEFAULT_SYNC_EXCLUDES)
    # Other strings stay literal (the reference's dir/** also prunes the directory itself).
    assert submit.split_globs("data/**, *.log") == ["data/**", "/data/", "*.log"]
    assert submit.split_globs("") == []
    # Whatever the reference's globs leave out, the default leaves out too.
    literal = ExcludeMatcher(submit.split_globs(REFERENCE_CSV + ","))
    default = ExcludeMatcher(files.DEFAULT_SYNC_EXCLUDES)
    paths = [".git/config", ".hg/x", ".svn/x", "a/__pycache__/m.pyc", "pkg/m.pyc",
             ".venv/bin/python", "venv/lib/x.py", "build/lib/x.py", "dist/x.whl",
             "x.egg-info/PKG-INFO", ".mypy_cache/x", ".pytest_cache/x", ".ruff_cache/x"]
    for path in paths:
        assert literal(path), path
        assert default(path), path
    for extra in ("node_modules/x.js", ".ipynb_checkpoints/a.ipynb", ".DS_Store",
                  "sub/.git/config", "src/main.py"):
        assert not literal(extra) or default(extra), extra
    assert not default("src/main.py")


def _key(project: Path, **sync: Any) -> str:
    spec = submit.validate_spec({"sync": [{"local_dir": str(project), "remote_dir": "p", **sync}],
                                 "run": {"command": "python main.py"}})
    return submit.derive_key(spec)


def test_the_fingerprint_skips_exactly_what_sync_leaves_out(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "main.py").write_text("print(1)\n")
    (project / ".gitignore").write_text("*.log\n")
    before = _key(project)
    assert _key(project) == before
    # Left out by the default excludes or .gitignore: the key does not move.
    for junk in ("node_modules/x.js", ".ipynb_checkpoints/a-checkpoint.ipynb", ".DS_Store",
                 "env/bin/python", "sub/__pycache__/m.cpython-311.pyc", "x.egg-info/PKG-INFO",
                 ".git/HEAD", "run.log", "deep/build/out.o"):
        (project / junk).parent.mkdir(parents=True, exist_ok=True)
        (project / junk).write_text("junk")
        assert _key(project) == before, junk
    tree = files.scan_local(project, submit.split_globs(submit.DEFAULT_SYNC_EXCLUDES))
    assert sorted(tree.files) == [".gitignore", "main.py"]
    # A synced source changes it.
    (project / "data").mkdir()
    (project / "data" / "input.csv").write_text("1,2\n")
    changed = _key(project)
    assert changed != before
    # With the spec's own excludes, what they leave out does not count either.
    custom = _key(project, exclude_globs_csv="data/**")
    (project / "data" / "input.csv").write_text("3,4,5\n")
    assert _key(project, exclude_globs_csv="data/**") == custom
    assert _key(project) != changed


def test_a_spec_refuses_local_names_outside_the_collect_directory() -> None:
    for bad in ("/etc/cron.d/x", "../up.txt", "a/../../b"):
        with pytest.raises(ConfigError, match="relative to collect's local_dir"):
            submit.validate_spec({"run": {"command": "true"},
                                  "artifacts": [{"remote_path": "r.txt", "local_path": bad}]})
        with pytest.raises(ConfigError, match="relative to collect's local_dir"):
            submit.validate_spec({"run": {"command": "true"},
                                  "artifacts": [{"remote_dir": "out", "local_subdir": bad}]})
    ok = submit.validate_spec({"run": {"command": "true"}, "artifacts": [
        {"remote_path": "r.txt", "local_path": "sub/r.txt"}, {"remote_path": "s.txt",
                                                              "local_path": ""}]})
    assert [a.get("local_path") for a in ok["artifacts"]] == ["sub/r.txt", ""]


# --- collect ----------------------------------------------------------------------------------


def _finished_job(services: Services, command: str, artifacts: list[Any]) -> str:
    spec = {"run": {"command": command}, "artifacts": artifacts,
            "idempotency_key": f"test-submit-{time.time_ns()}"}
    result = services.run(services.submits.submit, spec)
    assert result["ok"], result
    job_id = str(result["job_id"])
    info = services.run(services.jobs.get(job_id).wait, timeout=60)
    assert info.exit_code == 0, info
    return job_id


def test_collect_refuses_local_targets_of_a_tampered_record(
        services: Services, tmp_path: Path) -> None:
    job_id = _finished_job(services, "mkdir -p tamper && echo fine > tamper/ok.txt",
                           ["tamper/ok.txt"])
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    hostile = [
        {"remote_path": "tamper/ok.txt", "local_path": str(outside / "abs.txt")},
        {"remote_path": "tamper/ok.txt", "local_path": "../escape.txt"},
        {"remote_path": "tamper/ok.txt", "local_path": "link/through.txt"},
        {"remote_dir": "tamper", "local_subdir": str(outside / "absdir")},
        {"remote_dir": "tamper", "local_subdir": "../updir"},
        {"remote_dir": "tamper", "local_subdir": "link"},
        "tamper/..",  # its basename is ".."
        42,
        "tamper/ok.txt",
    ]
    # Someone with write access to the remote rewrites the record collect trusts.
    record_file = services.root / submit.record_path(job_id)
    record = json.loads(record_file.read_text())
    record["artifacts"] = hostile
    services.run(services.files.write_text, submit.record_path(job_id), json.dumps(record))

    result = services.run(services.submits.collect, job_id, dest)
    assert not result["ok"]
    assert [d["ok"] for d in result["downloads"]] == [False] * 8 + [True]
    for refused in result["downloads"][:7]:
        assert "refusing" in refused["error"], refused
    assert "neither" in result["downloads"][7]["error"]
    assert result["missing"] == hostile[:8]
    assert (dest / "ok.txt").read_text() == "fine\n"
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "outside"]
    assert sorted(p.name for p in dest.iterdir()) == ["link", "ok.txt"]


def test_collect_does_not_overwrite_artifacts_that_share_a_local_name(
        services: Services, tmp_path: Path) -> None:
    job_id = _finished_job(
        services, "mkdir -p clash/a clash/b && echo A > clash/a/out.txt && echo B > clash/b/out.txt",
        ["clash/a/out.txt", "clash/b/out.txt",
         {"remote_path": "clash/b/out.txt", "local_path": "b/out.txt"},
         {"remote_dir": "clash/a"}, {"remote_dir": "clash/b"},
         {"remote_dir": "clash/b", "local_subdir": "b-dir"}])
    dest = tmp_path / "dest"
    result = services.run(services.submits.collect, job_id, dest)
    oks = [d["ok"] for d in result["downloads"]]
    assert oks == [True, False, True, True, False, True]
    for clash, first in ((1, "clash/a/out.txt"), (4, {"remote_dir": "clash/a",
                                                      "local_subdir": "artifact_dir"})):
        error = result["downloads"][clash]["error"]
        assert "not downloaded rather than overwritten" in error and repr(first) in error
    assert result["missing"] == ["clash/b/out.txt",
                                 {"remote_dir": "clash/b", "local_subdir": "artifact_dir"}]
    # The first one keeps its place; the basename default holds where nothing collides.
    assert (dest / "out.txt").read_text() == "A\n"
    assert (dest / "b" / "out.txt").read_text() == "B\n"
    assert (dest / "artifact_dir" / "out.txt").read_text() == "A\n"
    assert (dest / "b-dir" / "out.txt").read_text() == "B\n"


def test_submit_syncs_bootstraps_starts_once_and_collect_fetches_the_artifacts(
        services: Services, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "data.txt").write_text("hello\n")
    (project / "main.sh").write_text("cat data.txt > out/r.txt\n")
    spec = {"sync": [{"local_dir": str(project), "remote_dir": "p"}],
            "bootstrap": {"cwd": "p", "commands": ["mkdir -p out"]},
            "run": {"cwd": "p", "command": "sh main.sh"}, "artifacts": ["p/out/r.txt"]}
    dry = services.run(services.submits.submit, spec, dry_run=True)
    assert dry["ok"] and dry["dry_run"] and dry["job_id"] is None
    assert dry["sync"][0]["would_upload"] and not (services.root / "p").exists()

    first = services.run(services.submits.submit, spec)
    assert first["ok"] and not first["reused"] and first["sync"][0]["uploaded"] == 2
    assert [r["returncode"] for r in first["bootstrap"]["results"]] == [0]
    again = services.run(services.submits.submit, spec)  # a retry: the same job, not a new run
    assert again["reused"] and again["job_id"] == first["job_id"]
    assert services.run(services.jobs.get(first["job_id"]).wait, 30).exit_code == 0
    collected = services.run(services.submits.collect, first["job_id"], tmp_path / "results")
    assert collected["ok"] and (tmp_path / "results" / "r.txt").read_text() == "hello\n"

    failing = {**spec, "bootstrap": {"cwd": "p", "commands": ["exit 4"]}}
    result = services.run(services.submits.submit, failing)
    assert not result["ok"] and result["job_id"] is None and "exit 4" in result["error"]
