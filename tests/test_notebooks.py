"""Notebooks: read / edit / run round trips against a real jupyter_server, a concurrent save
refused, cell outputs written back, a 20-cell notebook job followed across a controller
restart, real-time collaboration (the real jupyter-server-ydoc) detected; the pure core
(ops, limits, views, output recording, papermill-style parameters) in fast unit tests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from jupyter_tether import InvalidArgument, LimitExceeded, NotFound, Tether
from jupyter_tether.controller.embedded import LocalJupyterServer
from jupyter_tether.controller.notebooks import document as doc
from jupyter_tether.controller.notebooks import runs
from jupyter_tether.controller.notebooks.outputs import FileLimits, OutputRecorder
from jupyter_tether.controller.notebooks.remote_runner import inject_parameters
from jupyter_tether.errors import Conflict

from .cli_inprocess import run_cli
from .conftest import fast_options
from .server_extensions import extension_site, server_with_extension


def _nbformat() -> Any:
    # Imported when a test uses it: nbformat's schema checkers cost ~1 s to import, which
    # every test worker would otherwise pay at collection.
    import nbformat

    return nbformat

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5E"
    "rkJggg==")


def write_nb(path: Path, sources: list[str], *, minor: int = 5, tags: dict[int, list[str]]
             | None = None) -> None:
    nb = _nbformat().v4.new_notebook()
    nb.nbformat_minor = minor
    for i, source in enumerate(sources):
        cell = _nbformat().v4.new_code_cell(source)
        if tags and i in tags:
            cell.metadata["tags"] = tags[i]
        if minor < 5:
            cell.pop("id", None)
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")


def server_validates(tether: Tether, rel: str) -> dict[str, Any]:
    """The notebook as jupyter_server's contents API returns it: its validator's verdict is
    the model's ``message`` (None when the notebook is valid)."""
    model: dict[str, Any] = tether.portal.call(tether.aio.rest.get_json, f"api/contents/{rel}")
    return model


# --- the pure core ----------------------------------------------------------------------------


def _nb(*sources: str) -> dict[str, Any]:
    nb = doc.new_notebook()
    nb["cells"] = [doc.new_cell("code", s) for s in sources]
    return nb


def test_ops_apply_in_order_and_address_cells_by_id_or_index() -> None:
    nb = _nb("a = 1", "b = 2", "c = 3")
    first, second, third = (c["id"] for c in nb["cells"])
    done = doc.apply_ops(nb, [
        {"op": "insert", "source": "# Title", "cell_type": "markdown", "index": 0},
        {"op": "replace", "cell": second, "source": "b = 20", "tags": ["parameters"]},
        {"op": "move", "cell": third, "to": 1},
        {"op": "delete", "cell": -1},  # the last cell now: b = 20
        {"op": "insert", "after": first, "source": "d = 4"},
    ])
    assert [doc.text_of(c["source"]) for c in nb["cells"]] == ["# Title", "c = 3", "a = 1",
                                                              "d = 4"]
    assert done[0]["id"] == nb["cells"][0]["id"] and done[3]["id"] == second
    doc.validate(nb, "x.ipynb")


def test_a_bad_op_changes_nothing_and_says_which() -> None:
    nb = _nb("a = 1")
    before = json.dumps(nb)
    with pytest.raises(InvalidArgument, match=r"ops\[1\] \(delete\): no cell with id 'nope'"):
        doc.apply_ops(json.loads(before), [{"op": "insert", "source": "x"},
                                           {"op": "delete", "cell": "nope"}])
    with pytest.raises(InvalidArgument, match="out of range"):
        doc.apply_ops(nb, [{"op": "move", "cell": 0, "to": 5}])
    with pytest.raises(InvalidArgument, match="unknown op"):
        doc.apply_ops(nb, [{"op": "explode"}])
    assert json.dumps(nb) == before


def test_changing_a_code_cell_to_markdown_keeps_it_valid() -> None:
    nb = _nb("print(1)")
    nb["cells"][0]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    nb["cells"][0]["execution_count"] = 1
    doc.apply_ops(nb, [{"op": "replace", "cell": 0, "cell_type": "markdown"}])
    assert "outputs" not in nb["cells"][0]
    doc.validate(nb, "x.ipynb")
    nb["cells"][0]["outputs"] = []  # what a careless edit would leave
    with pytest.raises(InvalidArgument, match="would not be a valid notebook"):
        doc.validate(nb, "x.ipynb")


def test_old_notebooks_get_ids_and_minor_5() -> None:
    nb = _nb("a", "b")
    nb["nbformat_minor"] = 4
    for cell in nb["cells"]:
        del cell["id"]
    nb["cells"].append(dict(nb["cells"][0]))
    assert doc.ensure_ids(nb)
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == 3 and nb["nbformat_minor"] == 5
    doc.validate(nb, "x.ipynb")
    assert not doc.ensure_ids(nb)


def test_parse_refuses_what_is_not_a_bounded_v4_notebook() -> None:
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        doc.parse(b"{nope", "x.ipynb")
    with pytest.raises(InvalidArgument, match="nbformat 3"):
        doc.parse(json.dumps({"nbformat": 3, "cells": []}).encode(), "x.ipynb")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        doc.parse(b"[" * 100_000 + b"]" * 100_000, "x.ipynb")  # nesting past the parser
    small = doc.DocLimits(max_bytes=10_000, max_cells=2)
    with pytest.raises(LimitExceeded, match="over 10,000 bytes"):
        doc.parse(b" " * 10_001, "x.ipynb", small)
    with pytest.raises(LimitExceeded, match="3 cells"):
        doc.parse(json.dumps(_nb("a", "b", "c")).encode(), "x.ipynb", small)


def test_views_bound_every_part_and_save_images_to_files(tmp_path: Path) -> None:
    nb = _nb("x" * 50_000)
    nb["cells"][0]["outputs"] = [
        {"output_type": "stream", "name": "stdout", "text": "line\n" * 10_000},
        {"output_type": "display_data", "metadata": {},
         "data": {"image/png": base64.b64encode(PNG).decode(), "text/html": "<b>x</b>",
                  "text/plain": "<Figure>"}},
        {"output_type": "error", "ename": "E", "evalue": "v" * 10_000,
         "traceback": [f"\x1b[31mframe {i}\x1b[0m" for i in range(500)]},
    ] + [{"output_type": "stream", "name": "stdout", "text": "more"}] * 100
    images = doc.ImageSaver(tmp_path)
    view = doc.notebook_view(nb, start=0, limit=10, mode="brief", images=images)
    cell = view["cells"][0]
    assert cell["source_truncated"] and len(cell["source"]) < 21_000
    stream, display, error = cell["outputs"][:3]
    assert stream["text"].startswith("[... ") and len(stream["text"]) < 2_100
    saved = Path(display["data"]["image/png"]["saved_to"])
    assert saved.read_bytes() == PNG and display["other_mimes"] == ["text/html"]
    assert "\x1b" not in "".join(error["traceback"]) and len(error["traceback"]) <= 11
    assert len(cell["outputs"]) == doc.DOC_LIMITS.max_outputs and cell["omitted_outputs"] == 73
    # Read again: the same file, not a second copy.
    doc.notebook_view(nb, start=0, limit=1, mode="full", images=doc.ImageSaver(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1


def test_recorder_applies_clear_output_and_display_updates_within_limits() -> None:
    rec = OutputRecorder(FileLimits(max_outputs=3, max_stream_chars=10))
    rec.feed("stream", {"name": "stdout", "text": "12345"})
    rec.feed("stream", {"name": "stdout", "text": "67890abc"})
    assert rec.outputs[0]["text"].endswith("4567890abc")
    rec.feed("clear_output", {"wait": True})
    assert len(rec.outputs) == 1  # cleared only when the next output comes
    rec.feed("display_data", {"data": {"text/plain": "v1"}, "transient": {"display_id": "d"}})
    rec.feed("update_display_data", {"data": {"text/plain": "v2"}, "transient": {"display_id": "d"}})
    assert [o.get("data") for o in rec.outputs] == [{"text/plain": "v2"}]
    for i in range(5):
        rec.feed("display_data", {"data": {"text/plain": str(i), "image/png": 7}})
    outputs = rec.result()
    assert len(outputs) == 4 and "3 more outputs not kept" in outputs[-1]["text"]
    nb = _nb("x")
    nb["cells"][0]["outputs"] = outputs
    doc.validate(nb, "x.ipynb")  # a non-string image value became a string


def test_parameters_go_after_the_parameters_cell_replacing_an_earlier_injection() -> None:
    nb = _nb("alpha = 1", "print(alpha)")
    nb["cells"][0]["metadata"]["tags"] = ["parameters"]
    inject_parameters(nb, {"alpha": 5, "name": "x"})
    inject_parameters(nb, {"alpha": 7})
    sources = [doc.text_of(c["source"]) for c in nb["cells"]]
    assert sources == ["alpha = 1", "# Parameters\nalpha = 7\n", "print(alpha)"]
    assert nb["cells"][1]["metadata"]["tags"] == ["injected-parameters"]
    doc.validate(nb, "x.ipynb")


def test_the_remote_runner_needs_only_python_3_9_and_jupyter_client() -> None:
    import ast

    from jupyter_tether.controller.notebooks import remote_runner

    tree = ast.parse(Path(remote_runner.__file__).read_text(), feature_version=(3, 9))
    # ``X | None`` annotations stay unevaluated strings on 3.9 only with this import.
    assert any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)
    for node in ast.walk(tree):
        assert not isinstance(node, ast.Match)
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            root = name.split(".")[0]
            assert root in sys.stdlib_module_names or root == "jupyter_client", name


# --- hostile notebooks and outputs --------------------------------------------------------------


def _deep(levels: int) -> Any:
    return json.loads("[" * levels + "]" * levels)


def test_parse_refuses_nesting_that_an_edit_could_not_write_back() -> None:
    # json.loads takes ~990 levels, but deepcopy and nbformat's writer recurse in Python:
    # a notebook nested 600 deep parsed, then every edit died of RecursionError.
    nb = _nb("x = 1")
    nb["cells"][0]["metadata"]["deep"] = _deep(600)
    with pytest.raises(InvalidArgument, match="nested deeper than"):
        doc.parse(json.dumps(nb).encode(), "x.ipynb")
    nb["cells"][0]["metadata"]["deep"] = _deep(doc.DOC_LIMITS.max_depth - 5)
    parsed = doc.parse(json.dumps(nb).encode(), "x.ipynb")
    doc.apply_ops(parsed, [{"op": "insert", "source": "y = 2"}])
    assert doc.dumps(parsed, "x.ipynb")


def test_a_malformed_cell_is_refused_in_one_line_not_a_traceback() -> None:
    # nbformat's own error reporting raises TypeError on a cell_type that is not a string.
    nb = doc.parse(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": 5, "id": "a", "metadata": {}, "source": ""}]}).encode(), "x.ipynb")
    with pytest.raises(InvalidArgument, match=r"would not be a valid notebook.*nothing was"):
        doc.dumps(nb, "x.ipynb")


def test_recorded_outputs_stay_writable_whatever_the_kernel_sends() -> None:
    rec = OutputRecorder()
    rec.feed("display_data", {"data": {"text/plain": "x", "application/json": {"a": _deep(600)},
                                       "text/html": _deep(600)},
                              "metadata": {"m": _deep(600)}})
    rec.feed("display_data", {"data": {"text/plain": "y"}, "metadata": {"ok": {"a": [1]}}})
    nb = _nb("x")
    nb["cells"][0]["outputs"] = rec.result()
    assert doc.dumps(nb, "x.ipynb")  # was RecursionError
    first, second = nb["cells"][0]["outputs"]
    assert first["metadata"] == {} and "application/json" not in first["data"]
    assert isinstance(first["data"]["text/html"], str)  # a text type: kept as its JSON text
    assert second["metadata"] == {"ok": {"a": [1]}}


def test_views_show_only_sane_ids_and_bounded_facts() -> None:
    nb = _nb("a", "b")
    nb["cells"][0]["id"] = "a" * 1_000_000
    nb["cells"][1]["id"] = "x\x1b]0;owned\x07"
    nb["nbformat_minor"] = "9" * 1_000_000
    view = doc.notebook_view(nb, start=0, limit=5, mode="brief", images=None)
    assert [c["id"] for c in view["cells"]] == [None, None]
    assert len(json.dumps(view)) < 2_000
    doc.ensure_ids(nb)  # what an edit or a run does first: ids it can address
    assert all(c["id"] for c in doc.notebook_view(nb, start=0, limit=5, mode="brief",
                                                  images=None)["cells"])


def test_the_cli_prints_remote_text_without_terminal_controls() -> None:
    from jupyter_tether.cli.notebooks import _cell_lines

    osc = "\x1b]52;c;ZWNobyBvd25lZA==\x1b\\"  # OSC 52: writes the terminal's clipboard
    cell = {"index": 0, "id": "a\x1b[2J", "cell_type": "code", "status": "error\x9b2J",
            "source": f"print(1)  {osc}\n\x1b]0;title\x07x = 1",
            "outputs": [{"type": "stream", "text": f"out {osc}\r\n"},
                        {"type": "error", "traceback": [f"\x1b[31mValueError\x1b[0m: {osc}"]},
                        {"type": "execute_result", "data": {"text/plain": f"'{osc}'"}}]}
    text = "\n".join(_cell_lines(cell))
    assert not [c for c in text if (ord(c) < 32 and c not in "\n\t") or 127 <= ord(c) < 160]
    assert "print(1)" in text and "ValueError: " in text and "out " in text
    # A progress bar redrawn in place shows as the terminal would end up showing it.
    bar = {"index": 1, "cell_type": "code", "source": "",
           "outputs": [{"type": "stream", "text": " 10%|#  \r 50%|#####  \r100%|##########\r\n"}]}
    assert _cell_lines(bar) == ["[1] code", "  | 100%|##########"]


def test_the_runner_does_not_write_through_a_planted_temp_file(tmp_path: Path) -> None:
    from jupyter_tether.controller.notebooks import remote_runner

    out = tmp_path / "out.ipynb"
    out.write_text("{}")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # Another user on the host plants a link where the runner's temp file used to go.
    (tmp_path / f".out.ipynb.tether-{os.getpid()}.tmp").symlink_to(victim)
    remote_runner.write_atomic(str(out), _nb("a"))
    assert victim.read_text() == "precious"
    assert json.loads(out.read_text())["cells"][0]["source"] == "a"


@pytest.mark.parametrize("content", ["[]", '{"nbformat": 4, "cells": [1]}',
                                     '{"nbformat": 4, "cells": [], "metadata": []}'])
def test_the_runner_refuses_a_malformed_notebook_with_exit_2(
        tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]) -> None:
    from jupyter_tether.controller.notebooks import remote_runner

    (tmp_path / "bad.ipynb").write_text(content)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"notebook": str(tmp_path / "bad.ipynb"), "parameters": {}}))
    assert remote_runner.main(["runner", str(spec)]) == 2
    assert "cannot read" in capsys.readouterr().out


# --- against a real server ----------------------------------------------------------------------


def test_read_edit_run_round_trip_stays_valid_for_the_server(tether: Tether,
                                                            server_root: Path) -> None:
    rel = "nbtest/round.ipynb"
    made = tether.notebooks.edit(rel, [
        {"op": "insert", "cell_type": "markdown", "source": "# Round trip"},
        {"op": "insert", "source": "x = 6 * 7\nx"},
    ], expected_revision=None, create=True)
    assert made["created"] and made["n_cells"] == 2
    read = tether.notebooks.read(rel)
    assert read["revision"] == made["revision"] and read["cells"][1]["source"] == "x = 6 * 7\nx"
    run = tether.notebooks.run(rel, timeout=60)
    assert run["status"] == "ok", run
    assert run["cells"][0]["outputs"][0]["data"]["text/plain"] == "42"
    edited = tether.notebooks.edit(rel, [{"op": "insert", "source": "print(x + 1)"}],
                                   expected_revision=run["revision"])
    tether.notebooks.run(rel, [edited["ops"][0]["id"]])
    on_disk = _nbformat().read(server_root / rel, as_version=4)
    _nbformat().validate(on_disk)
    assert on_disk.cells[1].outputs[0]["data"]["text/plain"] == "42"
    assert on_disk.cells[2].outputs[0]["text"] == "43\n"
    assert on_disk.cells[2].execution_count == on_disk.cells[1].execution_count + 1
    model = server_validates(tether, rel)
    assert model.get("message") is None and model["content"]["cells"][2]["outputs"]
    # The same check does catch an invalid file (so its silence above means something).
    broken = json.loads((server_root / rel).read_text())
    broken["cells"][1]["execution_count"] = "forty-two"
    (server_root / "nbtest/broken.ipynb").write_text(json.dumps(broken))
    assert "validation failed" in (server_validates(tether, "nbtest/broken.ipynb").get("message") or "")


def test_a_save_between_read_and_edit_is_refused(tether: Tether, server_root: Path) -> None:
    rel = "nbtest/concurrent.ipynb"
    write_nb(server_root / rel, ["a = 1"])
    read = tether.notebooks.read(rel)
    # A person saves from JupyterLab: a PUT through the contents API.
    model = server_validates(tether, rel)
    model["content"]["cells"][0]["source"] = "a = 2  # the person's edit"
    tether.portal.call(lambda: tether.aio.rest.request(
        "PUT", f"api/contents/{rel}", json={"type": "notebook", "format": "json",
                                             "content": model["content"]}))
    saved = (server_root / rel).read_bytes()
    with pytest.raises(Conflict, match="changed since you read it"):
        tether.notebooks.edit(rel, [{"op": "replace", "cell": 0, "source": "a = 3"}],
                              expected_revision=read["revision"])
    assert (server_root / rel).read_bytes() == saved
    again = tether.notebooks.read(rel)
    done = tether.notebooks.edit(rel, [{"op": "replace", "cell": 0, "source": "a = 3"}],
                                 expected_revision=again["revision"])
    assert done["revision"] != again["revision"]
    with pytest.raises(NotFound):
        tether.notebooks.read("nbtest/missing.ipynb")


def test_a_save_landing_after_the_read_is_refused_at_the_write(tether: Tether,
                                                              server_root: Path) -> None:
    # The write carries the sha256 of what the edit read, and the remote compares it with the
    # file right before its rename. (The old check, a stat one round trip before the write,
    # refuses this sequence too; the race it missed, a save inside that round trip, is
    # shown by test_conditional_writes_replace_only_the_content_they_were_based_on.)
    rel = "nbtest/race.ipynb"
    write_nb(server_root / rel, ["a = 1"])
    notebooks = tether.aio.notebooks
    persons = b'"a = 2  # saved by a person"'

    async def edit_racing_a_save() -> None:
        read_sha256, data, _ = await notebooks._load(rel)
        (server_root / rel).write_bytes(data.replace(b'"a = 1"', persons))
        await notebooks._write(rel, read_sha256, data.replace(b'"a = 1"', b'"a = 3"'))

    with pytest.raises(Conflict, match="changed since you read it"):
        tether.portal.call(edit_racing_a_save)
    assert persons in (server_root / rel).read_bytes()
    # The same for a file too big for one message (a chunked upload's commit).
    big = server_root / "nbtest" / "big.bin"
    big.write_bytes(b"person")
    with pytest.raises(Conflict, match="changed since it was read"):
        tether.files.write_bytes("nbtest/big.bin", b"x" * (5 * 1024 * 1024),
                                 if_sha256=hashlib.sha256(b"earlier").hexdigest())
    assert big.read_bytes() == b"person"


def test_a_cell_that_prints_displays_and_raises_leaves_its_outputs(tether: Tether,
                                                                  server_root: Path) -> None:
    rel = "nbtest/outputs.ipynb"
    write_nb(server_root / rel, [
        "import base64\nfrom IPython.display import Image, display\n"
        "print('hello from the cell')\n"
        f"display(Image(data=base64.b64decode({base64.b64encode(PNG).decode()!r})))\n"
        "1 / 0",
        "print('never')",
    ], minor=4)  # old notebooks get ids on their first run
    run = tether.notebooks.run(rel, kernel="notebook")
    assert run["status"] == "error" and run["kernel"] == "notebook"
    cell = run["cells"][0]
    assert cell["status"] == "error" and len(run["skipped"]) == 1
    assert Path(cell["outputs"][1]["data"]["image/png"]["saved_to"]).read_bytes() == PNG
    on_disk = _nbformat().read(server_root / rel, as_version=4)
    _nbformat().validate(on_disk)
    first = on_disk.cells[0]
    kinds = [o["output_type"] for o in first.outputs]
    assert kinds == ["stream", "display_data", "error"]
    assert first.outputs[0]["text"] == "hello from the cell\n"
    assert base64.b64decode(first.outputs[1]["data"]["image/png"]) == PNG
    assert first.outputs[2]["ename"] == "ZeroDivisionError" and first.outputs[2]["traceback"]
    assert isinstance(first.execution_count, int)
    assert on_disk.cells[1].outputs == [] and on_disk.cells[1].execution_count is None
    # The notebook session now holds the kernel: JupyterLab opening it shares that state.
    again = tether.notebooks.run(rel, [1])
    assert again["kernel"] == "session" and again["kernel_id"] == run["kernel_id"]
    for session in tether.list_sessions():
        if session.get("path") == rel:
            tether.portal.call(tether.aio.rest.delete_session, session["id"])


def test_a_write_back_failing_in_any_way_ends_only_the_run_not_the_tether(
        tether: Tether) -> None:
    # A run lives in the tether's task group: an error from writing its outputs back that
    # was not a TetherError (a bug, or a file shaped to trip the merge) escaped ``drive``
    # and ended the tether itself, with every call on it.
    aio = tether.aio

    async def failing_write(updates: runs.Updates) -> tuple[str, list[str]]:
        raise RuntimeError("merge tripped")

    async def scenario() -> runs.NotebookRun:
        kernel_id = await aio.work_kernel_id()
        run = runs.NotebookRun(run_id="r-write", path="x.ipynb", kernel_id=kernel_id,
                               kernel="work", write_back=True,
                               cells=[runs.CellRecord(id="c1", index=0, code="6 * 7")])

        async def interrupt() -> None:
            pass

        hooks = runs.RunHooks(socket=lambda: aio._work_socket(kernel_id),
                              lock=aio._work_locks.setdefault(kernel_id, anyio.Lock()),
                              interrupt=interrupt, write=failing_write)
        await runs.drive(run, hooks)
        return run

    run = tether.portal.call(scenario)
    assert run.done.is_set() and run.status == "ok" and run.cells[0].status == "ok"
    assert run.write_error == "outputs not written back: RuntimeError: merge tripped"
    assert tether.exec("1 + 1").status == "ok"  # the tether lives on


def test_a_long_run_returns_a_handle_and_keeps_writing(tether: Tether, server_root: Path) -> None:
    rel = "nbtest/long.ipynb"
    write_nb(server_root / rel, ["import time\ntime.sleep(3)\nprint('slept')", "print('after')"])
    first = tether.notebooks.run(rel, kernel="work", timeout=0.5)
    assert first["status"] == "running" and first["run_id"] and "run_id=" in first["hint"]
    done = tether.notebooks.wait(first["run_id"], timeout=60)
    assert done["status"] == "ok" and done["cells_done"] == 2
    cells = _nbformat().read(server_root / rel, as_version=4).cells
    assert cells[0].outputs[0]["text"] == "slept\n" and cells[1].outputs[0]["text"] == "after\n"


def test_a_cancelled_run_interrupts_the_kernel_and_keeps_what_finished(
        tether: Tether, server_root: Path) -> None:
    rel = "nbtest/cancel.ipynb"
    write_nb(server_root / rel, ["print('first')", "import time\ntime.sleep(60)",
                                 "print('never')"])
    started = tether.notebooks.run(rel, kernel="work", timeout=1.5)
    for _ in range(120):  # until the first cell is done (a fresh work kernel starts first)
        if started["cells_done"] >= 1:
            break
        started = tether.notebooks.wait(started["run_id"], timeout=0.5)
    assert started["status"] == "running" and started["running_cell"]
    stopped = tether.notebooks.cancel(started["run_id"])
    assert stopped["status"] == "cancelled"
    assert [c["status"] for c in stopped["cells"]] == ["ok", "aborted"]
    assert len(stopped["skipped"]) == 1
    cells = _nbformat().read(server_root / rel, as_version=4).cells
    assert cells[0].outputs[0]["text"] == "first\n" and cells[2].outputs == []
    # The kernel was interrupted, not left sleeping: it answers at once.
    assert tether.exec("1 + 1", timeout=20).ok


def test_outputs_too_deep_to_write_back_leave_the_tether_working(
        jupyter_server: LocalJupyterServer, server_root: Path, tmp_path: Path) -> None:
    rel, bad = "nbtest/deep.ipynb", "nbtest/badspec.ipynb"
    write_nb(server_root / rel, [
        "from IPython.display import publish_display_data\n"
        "deep = []\nfor _ in range(600):\n    deep = [deep]\n"
        "publish_display_data({'text/plain': 'shown'}, metadata={'deep': deep})\n"
        "print('after')"])
    write_nb(server_root / bad, ["print('ran')"])
    nb = json.loads((server_root / bad).read_text())
    nb["metadata"]["kernelspec"] = "python3"  # the wrong type, as a hand-edited file may have
    (server_root / bad).write_text(json.dumps(nb))
    # Its own tether: before, the write-back's RecursionError escaped the run and ended the
    # tether's task group (every later call failed).
    with Tether(jupyter_server.url, jupyter_server.token, options=fast_options(),
                output_dir=tmp_path) as t:
        run = t.notebooks.run(rel, kernel="work", timeout=60)
        assert run["status"] == "ok" and run["written"], (run.get("write_error"),
                                                          run.get("problem"))
        cell = _nbformat().read(server_root / rel, as_version=4).cells[0]
        assert [o["output_type"] for o in cell.outputs] == ["display_data", "stream"]
        assert cell.outputs[0]["metadata"] == {} and cell.outputs[1]["text"] == "after\n"
        assert t.exec("1 + 1", timeout=20).ok
        # A kernelspec of the wrong type: the cells run (was AttributeError), and the file,
        # which nbformat would not accept, is left as it was, saying why.
        run = t.notebooks.run(bad, kernel="notebook", timeout=60)
        assert run["status"] == "ok" and run["cells"][0]["outputs"][0]["text"] == "ran\n"
        assert "would not be a valid notebook" in run["write_error"]
        for session in t.list_sessions():
            if session.get("path") == bad:
                t.portal.call(t.aio.rest.delete_session, session["id"])


def test_a_run_uses_the_kernel_of_the_open_notebook(tether: Tether, server_root: Path) -> None:
    rel = "nbtest/open.ipynb"
    write_nb(server_root / rel, ["shared_value = 1234"])
    # JupyterLab opening the notebook creates this session.
    session = tether.portal.call(lambda: tether.aio.rest.create_session(
        name="open.ipynb", path=rel, session_type="notebook"))
    kernel_id = session["kernel"]["id"]
    try:
        run = tether.notebooks.run(rel)
        assert run["kernel"] == "session" and run["kernel_id"] == kernel_id
        seen = tether.exec("shared_value", kernel_id=kernel_id)
        assert seen.results[0]["data"]["text/plain"] == "1234"
    finally:
        tether.portal.call(tether.aio.rest.delete_session, session["id"])


def _follow_until(job: Any, offset: int, needle: bytes) -> tuple[bytes, int]:
    seen = b""
    for chunk in job.follow(offset):
        seen += chunk
        if needle in seen:
            break
    return seen, offset + len(seen)


def test_a_notebook_job_survives_a_controller_restart(jupyter_server: LocalJupyterServer,
                                                      server_root: Path,
                                                      tmp_path: Path) -> None:
    rel = "nbtest/job.ipynb"
    sources = ["steps = 1"] + [f"import time\ntime.sleep(0.15)\nprint('cell', {i} * steps)"
                               for i in range(1, 20)]
    write_nb(server_root / rel, sources, tags={0: ["parameters"]})
    out_rel = "nbtest/job-out.ipynb"
    with Tether(jupyter_server.url, jupyter_server.token, options=fast_options(),
                output_dir=tmp_path) as first:
        job = first.notebooks.start(rel, parameters={"steps": 10}, output=out_rel)
        job_id = job.job_id
        log, offset = _follow_until(job, 0, b"[cell 5/21")
    # A new controller (another process could do the same) picks the job up by its id.
    with Tether(jupyter_server.url, jupyter_server.token, options=fast_options(),
                output_dir=tmp_path) as second:
        job = second.jobs.get(job_id)
        for chunk in job.follow(offset):
            log += chunk
        info = job.wait(timeout=120)
    text = log.decode()
    assert info.exit_code == 0, text
    assert text.count(" started") == 21 and text.count(" ok in ") == 21, text
    assert text.index("[cell 20/21") < text.index("[cell 21/21")
    out = _nbformat().read(server_root / out_rel, as_version=4)
    _nbformat().validate(out)
    code = [c for c in out.cells if c.cell_type == "code"]
    assert len(code) == 21 and "injected-parameters" in code[1].metadata["tags"]
    assert [c.execution_count for c in code] == list(range(1, 22))
    assert code[-1].outputs[0]["text"] == "cell 190\n"  # 19 * the injected steps
    assert out.metadata["jupyter_tether"]["status"] == "completed"
    # The source notebook is untouched (its outputs went to the output file).
    assert _nbformat().read(server_root / rel, as_version=4).cells[1].outputs == []


def test_a_failing_notebook_job_logs_the_traceback_and_exits_1(tether: Tether,
                                                               server_root: Path) -> None:
    rel = "nbtest/fails.ipynb"
    # The runner's kernel listens on unix sockets in a private folder: no tcp port to race
    # for on a busy host, none for other local users to reach.
    first = ("import ipykernel, json\n"
             "print('one', json.loads(ipykernel.get_connection_info())['transport'])")
    write_nb(server_root / rel, [first, "def f():\n    raise KeyError('boom')\nf()",
                                 "print('three')"])
    job = tether.notebooks.start(rel)
    info = job.wait(timeout=120)
    log = job.tail(100)
    assert info.exit_code == 1, log
    assert "[cell 2/3" in log and "error in" in log and "KeyError: 'boom'" in log
    assert "raise KeyError('boom')" in log and "[cell 3/3" not in log
    nb = _nbformat().read(server_root / rel, as_version=4)
    _nbformat().validate(nb)
    assert nb.metadata["jupyter_tether"]["status"] == "failed"
    assert nb.cells[1].outputs[-1]["ename"] == "KeyError" and nb.cells[2].outputs == []
    assert nb.cells[0].outputs[0]["text"] == "one ipc\n"


def test_nb_help_has_examples_and_a_missing_subcommand_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    from jupyter_tether import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["nb", "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and "jupyter-tether nb run" in out and "examples:" in out
    assert "--json" in out and "--target" in out
    assert cli.main(["nb"]) == 2
    assert "nb needs a subcommand" in capsys.readouterr().err


def test_nb_cli_shows_runs_and_starts(jupyter_server: LocalJupyterServer, server_root: Path,
                                      tmp_path: Path) -> None:
    rel = "nbtest/cli.ipynb"
    write_nb(server_root / rel, ["print('from the cli')", "raise ValueError('bad')"])
    env = {**os.environ, "REMOTE_JUPYTER_URL": jupyter_server.url,
           "REMOTE_JUPYTER_TOKEN": jupyter_server.token,
           "JUPYTER_TETHER_STATE_DIR": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), env)

    ran = cli("nb", "run", rel)
    assert ran.returncode == 1, ran.stderr
    assert "from the cli" in ran.stdout and "ValueError: bad" in ran.stdout
    shown = cli("nb", "show", rel, "--json")
    assert json.loads(shown.stdout)["cells"][0]["outputs"][0]["text"] == "from the cli\n"
    started = cli("nb", "start", rel, "--allow-errors", "-f")
    assert started.returncode == 0, started.stderr
    assert "[cell 2/2" in started.stdout and "ValueError: bad" in started.stdout


# --- real-time collaboration: the real jupyter-server-ydoc ---------------------------------------

RTC_PACKAGES = ["jupyter-server-ydoc==3.0.4", "jupyter-ydoc==4.2.1", "pycrdt==0.14.13",
                "pycrdt-websocket==0.16.5", "pycrdt-store==0.1.5", "sqlite-anyio==0.2.10",
                "jupyter-server-fileid==0.10.0"]
RTC_EXT_ENV = "JUPYTER_TETHER_RTC_EXT"


@pytest.fixture(scope="module")
def rtc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalJupyterServer]:
    site = extension_site(RTC_EXT_ENV, "jupyter-tether-rtc-ext-3.0.4", RTC_PACKAGES,
                          "jupyter_server_ydoc")
    with server_with_extension(site, "jupyter_server_ydoc", tmp_path_factory.mktemp("rtc-root"),
                               "rtc-server.log") as server:
        yield server


def test_collaboration_is_detected_and_file_writes_refused(rtc_server: LocalJupyterServer,
                                                           tether: Tether,
                                                           tmp_path: Path) -> None:
    rel = "shared.ipynb"
    write_nb(rtc_server.root_dir / rel, ["value = 5\nprint(value)"])
    before = (rtc_server.root_dir / rel).read_bytes()
    assert not tether.notebooks.collaboration()  # the plain server runs none
    with Tether(rtc_server.url, rtc_server.token, options=fast_options(),
                output_dir=tmp_path) as t:
        assert t.notebooks.collaboration()
        read = t.notebooks.read(rel)
        with pytest.raises(Conflict, match="real-time collaboration"):
            t.notebooks.edit(rel, [{"op": "insert", "source": "x"}],
                             expected_revision=read["revision"])
        with pytest.raises(Conflict, match="real-time collaboration"):
            t.notebooks.start(rel)
        run = t.notebooks.run(rel, kernel="work")
        assert run["status"] == "ok" and not run["written"]
        assert "real-time collaboration" in run["write_error"]
        assert run["cells"][0]["outputs"][0]["text"] == "5\n"
        assert (rtc_server.root_dir / rel).read_bytes() == before
        forced = t.notebooks.edit(rel, [{"op": "insert", "source": "x = 1"}],
                                  expected_revision=read["revision"], force=True)
        assert forced["n_cells"] == 2


# --- the MCP faces ---------------------------------------------------------------------------------


def test_notebook_tools_stay_lean() -> None:
    from mcp import Client

    from jupyter_tether.mcp_server.server import build_server

    async def sizes() -> dict[str, int]:
        async with Client(build_server(url="http://127.0.0.1:9/")) as client:
            listed = await client.list_tools()
        return {t.name: len(t.model_dump_json(by_alias=True, exclude_none=True))
                for t in listed.tools if "_nb_" in t.name}

    found = anyio.run(sizes)
    assert set(found) == {"jupyter_nb_read", "jupyter_nb_edit", "jupyter_nb_run",
                          "jupyter_nb_start"}
    assert sum(found.values()) <= 4_000, found


def test_mcp_edit_read_run_round_trip(jupyter_server: LocalJupyterServer, server_root: Path,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_mcp import Calls, in_process

    async def scenario() -> None:
        async with in_process(jupyter_server, tmp_path, monkeypatch) as client:
            calls = Calls(client)
            made = await calls.ok("jupyter_nb_edit", {
                "path": "nbtest/mcp.ipynb", "create": True, "expected_revision": "",
                "ops": [{"op": "insert", "source": "print('via mcp')"}]})
            stale = await calls.error("jupyter_nb_edit", {
                "path": "nbtest/mcp.ipynb", "expected_revision": "0" * 16,
                "ops": [{"op": "delete", "cell": 0}]})
            assert "changed since you read it" in stale
            blind = await calls.error("jupyter_nb_edit", {
                "path": "nbtest/mcp.ipynb", "expected_revision": "",
                "ops": [{"op": "delete", "cell": 0}]})
            assert "read the notebook first" in blind
            run = await calls.ok("jupyter_nb_run", {"path": "nbtest/mcp.ipynb", "wait_s": 0})
            if run["status"] == "running":
                run = await calls.ok("jupyter_nb_run", {"path": "nbtest/mcp.ipynb",
                                                        "run_id": run["run_id"], "wait_s": 60})
            assert run["status"] == "ok" and run["revision"] != made["revision"]
            read = await calls.ok("jupyter_nb_read", {"path": "nbtest/mcp.ipynb"})
            assert read["cells"][0]["outputs"][0]["text"] == "via mcp\n"
            job = await calls.ok("jupyter_nb_start", {"path": "nbtest/mcp.ipynb",
                                                      "output": "nbtest/mcp-out.ipynb"})
            log = await calls.follow_all(job["job_id"])
            assert "[cell 1/1" in log and " ok in " in log

    anyio.run(scenario)
