"""Notebook documents, pure: bounded parsing, the revision, cell views, edit ops, validation.

A notebook is remote content: its size, its cell count, every source and output may be
hostile. Parsing refuses what is over ``DocLimits``; views cut every text with a marker and
save images to local files (referenced by path, never inlined). Edits work on the parsed
dict and are validated with ``nbformat.validate`` (what jupyter_server itself runs) before
anything is written; nothing here talks to the remote.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...agent_payload.wire import ErrorCode
from ...errors import InvalidArgument, LimitExceeded
from ...formatting import strip_ansi
from ..execute import cap_head, cap_text, cap_traceback

CELL_TYPES = ("code", "markdown", "raw")
OUTPUT_MODES = ("brief", "full", "none")
_IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif",
                "image/svg+xml": ".svg"}


@dataclass(frozen=True)
class DocLimits:
    """What one notebook may hold before it is refused, and what one view shows of it."""

    #: the largest notebook file read (notebooks with many plots run to tens of MiB)
    max_bytes: int = 64 * 1024 * 1024
    max_cells: int = 20_000
    #: JSON nesting (json.loads takes ~990 levels, but deepcopy and nbformat's writer recurse
    #: in Python and fail far sooner; real notebooks nest a few dozen at most)
    max_depth: int = 100
    #: cells one read returns at most (``limit`` is clamped to it)
    max_view_cells: int = 200
    #: a cell's source in a view (the start is kept)
    max_source_chars: int = 20_000
    #: each text in a view: "brief" and "full"
    brief_chars: int = 2_000
    full_chars: int = 20_000
    #: outputs shown per cell (later ones are counted)
    max_outputs: int = 30
    #: images saved per view, and their bytes in all
    max_images: int = 20
    max_image_bytes: int = 32 * 1024 * 1024


DOC_LIMITS = DocLimits()


def invalid(message: str, **details: Any) -> InvalidArgument:
    return InvalidArgument(ErrorCode.INVALID_ARGUMENT, message, details)


def revision_of(data: bytes) -> str:
    """The notebook's revision: a hash of the file's bytes (any save changes it)."""
    return revision_from_sha256(hashlib.sha256(data).hexdigest())


def revision_from_sha256(sha256: str) -> str:
    """The revision of bytes whose sha256 is known already."""
    return sha256[:16]


def text_of(value: Any) -> str:
    """A notebook "multiline string" (a string or a list of strings) as one string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(part if isinstance(part, str) else str(part) for part in value)
    return "" if value is None else str(value)


def too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests more than ``limit`` lists and dicts (no recursion)."""
    if not isinstance(value, (dict, list)):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth >= limit and any(isinstance(c, (dict, list)) for c in children):
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def valid_id(value: Any) -> bool:
    """A cell id jupyter-tether keeps and shows (nbformat's pattern, at most 64 chars)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and value.isascii() and \
        all(c.isalnum() or c in "-_" for c in value)


def parse(data: bytes, path: str, limits: DocLimits = DOC_LIMITS) -> dict[str, Any]:
    """The notebook in ``data`` as a dict, refused when too big, not JSON, or not v4."""
    if len(data) > limits.max_bytes:
        raise LimitExceeded(f"{path}: the notebook is over {limits.max_bytes:,} bytes; "
                            "jupyter-tether does not read notebooks that large (clear its "
                            "outputs in JupyterLab first)", limit="DocLimits.max_bytes",
                            value=limits.max_bytes)
    try:
        nb = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise invalid(f"{path}: not a notebook (not valid JSON: {str(exc)[:200]})",
                      path=path) from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise invalid(f"{path}: not a notebook (no list of cells)", path=path)
    if too_deep(nb, limits.max_depth):
        raise invalid(f"{path}: not a notebook jupyter-tether edits (JSON nested deeper than "
                      f"{limits.max_depth} levels); clear its outputs in JupyterLab first",
                      path=path)
    if nb.get("nbformat") != 4:
        raise invalid(f"{path}: nbformat {str(nb.get('nbformat'))[:20]} is not supported (only "
                      "v4): convert it with `jupyter nbconvert --to notebook`", path=path)
    if len(nb["cells"]) > limits.max_cells:
        raise LimitExceeded(f"{path}: {len(nb['cells']):,} cells, over the "
                            f"{limits.max_cells:,} jupyter-tether handles",
                            limit="DocLimits.max_cells", value=limits.max_cells)
    for index, cell in enumerate(nb["cells"]):
        if not isinstance(cell, dict):
            raise invalid(f"{path}: cell {index} is not an object", path=path)
    if not isinstance(nb.get("metadata"), dict):
        nb["metadata"] = {}
    return nb


def new_notebook(kernel_name: str = "python3", display_name: str = "Python 3") -> dict[str, Any]:
    """An empty nbformat 4.5 notebook for ``kernel_name``."""
    return {"nbformat": 4, "nbformat_minor": 5, "cells": [], "metadata": {
        "kernelspec": {"name": kernel_name, "display_name": display_name,
                       "language": "python"},
        "language_info": {"name": "python"}}}


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def new_cell(cell_type: str, source: str, tags: list[str] | None = None) -> dict[str, Any]:
    if cell_type not in CELL_TYPES:
        raise invalid(f"cell_type {cell_type!r}: use one of {', '.join(CELL_TYPES)}")
    cell: dict[str, Any] = {"cell_type": cell_type, "id": new_id(), "metadata": {},
                            "source": source}
    if tags:
        cell["metadata"]["tags"] = list(tags)
    if cell_type == "code":
        cell.update(outputs=[], execution_count=None)
    return cell


def ensure_ids(nb: dict[str, Any]) -> bool:
    """Give every cell a unique id (nbformat 4.5, which the notebook is raised to).

    True when something changed. Ids are what edits, runs and write-backs find cells by,
    so a cell moved or inserted by a person in between still gets its own outputs.
    """
    changed = False
    if not isinstance(nb.get("nbformat_minor"), int) or nb["nbformat_minor"] < 5:
        nb["nbformat_minor"] = 5
        changed = True
    seen: set[str] = set()
    for cell in nb["cells"]:
        cid = cell.get("id")
        if not valid_id(cid) or cid in seen:
            cell["id"] = cid = new_id()
            changed = True
        seen.add(cid)
    return changed


def validate(nb: dict[str, Any], path: str) -> None:
    """Raise InvalidArgument unless ``nbformat.validate`` (jupyter_server's check) accepts it."""
    # Imported here: nbformat pulls in jsonschema's format checkers, whose rfc3987 grammar
    # takes ~1.4 s to build, a cost every CLI run and MCP start would pay otherwise.
    import nbformat

    try:
        nbformat.validate(nb)
    except Exception as exc:  # nbformat's own reporting fails on some wrong types (TypeError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise invalid(f"{path}: the result would not be a valid notebook ({first[:300]}); "
                      "nothing was written", path=path) from None


def dumps(nb: dict[str, Any], path: str) -> bytes:
    """The notebook as jupyter_server writes it (sorted keys, indent 1), after validation."""
    import nbformat

    validate(nb, path)
    return (nbformat.writes(nbformat.from_dict(nb), version=4) + "\n").encode("utf-8")


# --- finding cells and applying edit ops -----------------------------------------------------


def find_cell(cells: list[dict[str, Any]], ref: Any) -> int:
    """The index of the cell ``ref`` names: its id, or an index (negative from the end)."""
    if isinstance(ref, str):
        for index, cell in enumerate(cells):
            if cell.get("id") == ref:
                return index
        if not ref.lstrip("-").isdigit():
            raise invalid(f"no cell with id {ref[:80]!r} (read the notebook again: a cell "
                          "may have been deleted)")
        ref = int(ref)
    if isinstance(ref, bool) or not isinstance(ref, int):
        raise invalid(f"a cell is named by its id (a string) or its index, not {ref!r}")
    index = ref + len(cells) if ref < 0 else ref
    if not 0 <= index < len(cells):
        raise invalid(f"cell index {ref} is out of range (the notebook has {len(cells)} cells)")
    return index


def _position(cells: list[dict[str, Any]], value: Any, name: str) -> int:
    """An insertion point 0..len(cells) (negative from the end, -1 appends)."""
    if value is None:
        return len(cells)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer index, not {value!r}")
    index = value + len(cells) + 1 if value < 0 else value
    if not 0 <= index <= len(cells):
        raise invalid(f"{name}={value} is out of range (the notebook has {len(cells)} cells)")
    return index


def _source(op: dict[str, Any], required: bool) -> str | None:
    value = op.get("source")
    if value is None and not required:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(value)
    if not isinstance(value, str):
        raise invalid(f"{op.get('op')}: 'source' must be a string")
    return value


def _tags(op: dict[str, Any]) -> list[str] | None:
    tags = op.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise invalid(f"{op.get('op')}: 'tags' must be a list of strings")
    return tags


def _set_type(cell: dict[str, Any], cell_type: str) -> None:
    if cell_type not in CELL_TYPES:
        raise invalid(f"cell_type {cell_type!r}: use one of {', '.join(CELL_TYPES)}")
    cell["cell_type"] = cell_type
    if cell_type == "code":
        cell.setdefault("outputs", [])
        cell.setdefault("execution_count", None)
        cell.pop("attachments", None)  # only markdown and raw cells may have them
    else:
        cell.pop("outputs", None)
        cell.pop("execution_count", None)


def clear_outputs(cell: dict[str, Any]) -> None:
    if cell.get("cell_type") == "code":
        cell["outputs"] = []
        cell["execution_count"] = None


def apply_ops(nb: dict[str, Any], ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply edit ops in order to ``nb``, all or none; what each did, as a list.

    Ops: ``insert`` (``source``, ``cell_type`` = code, ``index`` or ``after`` a cell;
    default: the end), ``replace`` (``cell``; ``source`` and/or ``cell_type``), ``delete``
    (``cell``), ``move`` (``cell`` to index ``to``), ``clear_outputs`` (``cell``; all cells
    without one). ``cell`` is an id or an index into the notebook as the earlier ops left
    it; ``tags`` sets a cell's tags. One bad op raises and the caller writes nothing.
    """
    if not isinstance(ops, list) or not ops:
        raise invalid("ops must be a non-empty list of edit operations")
    # On a copy: a failing op leaves ``nb`` as it was (strings are shared, not copied).
    cells: list[dict[str, Any]] = copy.deepcopy(nb["cells"])
    done: list[dict[str, Any]] = []
    for number, op in enumerate(ops):
        if not isinstance(op, dict):
            raise invalid(f"ops[{number}] is not an object")
        kind = op.get("op")
        try:
            done.append(_apply_one(cells, op, kind))
        except InvalidArgument as exc:
            raise invalid(f"ops[{number}] ({kind}): {exc.message}; nothing was written") from None
    nb["cells"] = cells
    return done


def _apply_one(cells: list[dict[str, Any]], op: dict[str, Any], kind: Any) -> dict[str, Any]:
    if kind == "insert":
        if op.get("after") is not None:
            at = find_cell(cells, op["after"]) + 1
        else:
            at = _position(cells, op.get("index"), "index")
        cell = new_cell(str(op.get("cell_type") or "code"), _source(op, True) or "",
                        _tags(op))
        cells.insert(at, cell)
        return {"op": kind, "id": cell["id"], "index": at}
    if kind not in ("replace", "delete", "move", "clear_outputs"):
        raise invalid(f"unknown op {kind!r}: use insert, replace, delete, move or clear_outputs")
    if kind == "clear_outputs" and op.get("cell") is None:
        for cell in cells:
            clear_outputs(cell)
        return {"op": kind, "cells": len(cells)}
    if "cell" not in op:
        raise invalid("'cell' (an id or an index) is required")
    index = find_cell(cells, op["cell"])
    cell = cells[index]
    cid = cell.get("id")
    if kind == "delete":
        del cells[index]
        return {"op": kind, "id": cid, "index": index}
    if kind == "move":
        cells.pop(index)
        to = _position(cells, op.get("to"), "to")
        cells.insert(to, cell)
        return {"op": kind, "id": cid, "index": to}
    if kind == "clear_outputs":
        clear_outputs(cell)
        return {"op": kind, "id": cid, "index": index}
    source, cell_type, tags = _source(op, False), op.get("cell_type"), _tags(op)
    if source is None and cell_type is None and tags is None:
        raise invalid("replace needs 'source', 'cell_type' or 'tags'")
    if source is not None:
        cell["source"] = source
    if cell_type is not None and cell_type != cell.get("cell_type"):
        _set_type(cell, str(cell_type))
    if tags is not None:
        metadata = cell.setdefault("metadata", {})
        if tags:
            metadata["tags"] = tags
        else:
            metadata.pop("tags", None)
    return {"op": kind, "id": cid, "index": index}


# --- views: what a read (or a run) returns of cells and outputs ---------------------------------


class ImageSaver:
    """Writes images found in outputs to local files (named by their content, so a notebook
    read twice does not fill the disk twice), within a count and a byte budget."""

    def __init__(self, directory: Path, limits: DocLimits = DOC_LIMITS) -> None:
        self.directory = directory
        self.limits = limits
        self.count = 0
        self.bytes = 0

    def save(self, mime: str, data: Any) -> dict[str, Any]:
        text = text_of(data)
        if self.count >= self.limits.max_images or \
                self.bytes + len(text) * 3 // 4 > self.limits.max_image_bytes:
            return {"omitted_bytes": len(text), "note": f"not saved: at most "
                    f"{self.limits.max_images} images per call"}
        try:
            raw = text.encode() if mime == "image/svg+xml" else \
                base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            return {"omitted_bytes": len(text), "error": "undecodable image data"}
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"nb-{hashlib.sha256(raw).hexdigest()[:20]}{_IMAGE_TYPES[mime]}"
        target = self.directory / name
        if not target.exists():
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(raw)
            tmp.replace(target)
        self.count += 1
        self.bytes += len(raw)
        return {"saved_to": str(target)}


def _mime_value(mime: str, value: Any, limit: int) -> Any:
    if isinstance(value, (str, list)):
        text = text_of(value)
        return cap_head(text, limit, mime)[0] if mime.startswith("text/") and mime != \
            "text/plain" else cap_text(text, limit)[0]
    try:
        text = json.dumps(value, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return value if len(text) <= limit else cap_head(text, limit, mime)[0]


def output_view(output: Any, mode: str, images: ImageSaver | None,
                limits: DocLimits = DOC_LIMITS) -> dict[str, Any]:
    """One nbformat output as a program reads it, every part bounded."""
    if not isinstance(output, dict):
        return {"type": "invalid"}
    kind = str(output.get("output_type", ""))[:40]
    limit = limits.brief_chars if mode == "brief" else limits.full_chars
    if kind == "stream":
        return {"type": kind, "name": str(output.get("name", ""))[:20],
                "text": cap_text(strip_ansi(text_of(output.get("text"))), limit)[0]}
    if kind == "error":
        raw = output.get("traceback")
        lines = [strip_ansi(text_of(line)) for line in raw[-1000:]] if isinstance(raw, list) \
            else []
        traceback, _ = cap_traceback(lines, limit, 10 if mode == "brief" else 100)
        return {"type": kind, "ename": cap_head(text_of(output.get("ename")), 200)[0],
                "evalue": cap_head(text_of(output.get("evalue")), limit)[0],
                "traceback": traceback}
    if kind not in ("display_data", "execute_result"):
        return {"type": kind or "invalid"}
    data = output.get("data")
    data = data if isinstance(data, dict) else {}
    shown: dict[str, Any] = {}
    others: list[str] = []
    for count, (mime, value) in enumerate(data.items()):
        mime = str(mime)[:100]
        if count >= 32:
            others.append(f"... {len(data) - count} more")
            break
        if mime in _IMAGE_TYPES:
            shown[mime] = images.save(mime, value) if images is not None else \
                {"omitted_bytes": len(text_of(value))}
        elif mode == "full" or mime in ("text/plain", "text/markdown"):
            shown[mime] = _mime_value(mime, value, limit)
        else:
            others.append(mime)
    view: dict[str, Any] = {"type": kind, "data": shown}
    if others:
        view["other_mimes"] = others
    if kind == "execute_result" and isinstance(output.get("execution_count"), int):
        view["execution_count"] = output["execution_count"]
    return view


def cell_view(cell: dict[str, Any], index: int, mode: str, images: ImageSaver | None,
              limits: DocLimits = DOC_LIMITS) -> dict[str, Any]:
    """One cell as a read returns it: index, id, type, source (bounded), count, outputs."""
    source, cut = cap_head(text_of(cell.get("source")), limits.max_source_chars, "source")
    # An id from the file that edits would replace (too long, odd characters) is not shown.
    view: dict[str, Any] = {"index": index, "id": cell.get("id") if valid_id(
        cell.get("id")) else None, "cell_type": str(cell.get("cell_type", ""))[:20],
        "source": source}
    if cut:
        view["source_truncated"] = True
    tags = (cell.get("metadata") or {}).get("tags") if isinstance(cell.get("metadata"),
                                                                    dict) else None
    if isinstance(tags, list) and tags:
        view["tags"] = [str(t)[:100] for t in tags[:20]]
    if view["cell_type"] != "code":
        return view
    count = cell.get("execution_count")
    view["execution_count"] = count if isinstance(count, int) else None
    found = cell.get("outputs")
    outputs: list[Any] = found if isinstance(found, list) else []
    if mode == "none":
        view["n_outputs"] = len(outputs)
        return view
    view["outputs"] = [output_view(o, mode, images, limits) for o in outputs[:limits.max_outputs]]
    if len(outputs) > limits.max_outputs:
        view["omitted_outputs"] = len(outputs) - limits.max_outputs
    return view


def notebook_view(nb: dict[str, Any], *, start: int, limit: int, mode: str,
                  images: ImageSaver | None, limits: DocLimits = DOC_LIMITS) -> dict[str, Any]:
    """Cells ``start`` .. ``start + limit`` (limit clamped to ``max_view_cells``) and facts."""
    if mode not in OUTPUT_MODES:
        raise invalid(f"outputs={mode!r}: use one of {', '.join(OUTPUT_MODES)}")
    if start < 0 or limit < 0:
        raise invalid("start and limit must be >= 0")
    limit = min(limit, limits.max_view_cells)
    cells = nb["cells"]
    metadata = nb.get("metadata") or {}
    found = metadata.get("kernelspec")
    spec: dict[str, Any] = found if isinstance(found, dict) else {}
    return {
        "n_cells": len(cells), "start": start,
        "kernel_name": str(spec.get("name"))[:100] if spec.get("name") else None,
        "nbformat": f"{nb.get('nbformat')}.{str(nb.get('nbformat_minor'))[:10]}",
        "cells": [cell_view(cells[i], i, mode, images, limits)
                  for i in range(start, min(start + limit, len(cells)))],
    }


ProgressFn = Callable[[int, int, str], None]
