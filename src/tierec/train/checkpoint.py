"""Atomic, checksummed checkpoints.

Layout of a run's checkpoints::

    RUN/checkpoints/
      LATEST                     name of the newest complete checkpoint (replaced atomically)
      step-00000120/
        manifest.json            step, epoch, config, schema, tables, sha256 + size of every file, and
                                 the sha256 of the manifest's own fields (``manifest_sha256``)
        dense.pt                 dense weights, dense optimizer, RNG state (torch.save of tensors and
                                 plain containers only: loaded with ``weights_only=True``)
        tables/<name>.tbl        one file per table: float32 rows [num_embeddings, dim + state_dim],
                                 row r at byte offset r * (dim + state_dim) * 4 (weights, then state);
                                 or, for a table that tracks its written rows (all tables tierec
                                 trains), a *row set*: only the rows written since initialisation,
        tables/<name>.tbl.ids    packed in ID order, and their IDs; every other row is its initial
                                 value, a counter-based function of (seed, table, row) recorded in
                                 the manifest. Time and disk scale with the rows written.

A checkpoint is written into ``step-N.tmp-*``, every file fsynced, then renamed
to ``step-N`` and only then published in ``LATEST``: a crash at any point leaves
the previous checkpoint intact. Loading checks every file's size and sha256, and
the manifest's own fields (step, epoch, position, config) against ``manifest_sha256``.
The table files are the same fixed-offset row files the SSD tier reads
(`tierec.storage.tablefile`, which owns the format and its checks).

The checksums detect corruption, not tampering: whoever can write the files can
rewrite the checksums. What keeps a crafted checkpoint from running code is that
``dense.pt`` is unpickled with ``torch.load(weights_only=True)`` (tensors, numbers,
strings and containers only); everything else a checkpoint needs is JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tierec.errors import CheckpointError
from tierec.fsio import atomic_write_bytes, fsync_dir, umask
from tierec.storage.blockio import SequentialWriter
from tierec.storage.spill import release_pages
from tierec.storage.tablefile import check_bytes, read_table_file, verify_file, write_table_file

log = logging.getLogger(__name__)

FORMAT = "tierec-checkpoint"
VERSION = 2  # 2: manifest_sha256 covers the manifest's own fields; 1 (no such field) still loads
VERSIONS = (1, 2)
# Manifest keys every checkpoint has (`Trainer.save`); their absence means a broken manifest.
REQUIRED_KEYS = ("step", "files", "tables", "config", "schema", "epoch", "batch_in_epoch", "samples")


SYNC_THREADS = 2  # table files fsynced at once while the next table is read


def save_checkpoint(run_dir: str | os.PathLike, step: int, dense_state: dict, tables: dict, meta: dict,
                    keep: int = 2, parent: Path | None = None, max_chain: int = 1,
                    extra: dict[str, bytes] | None = None, arrays: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` and publish it in LATEST.

    ``tables`` maps table name -> storage (rows read by ID through its caches, or by range once
    flushed); ``meta`` is
    JSON-able (config, schema, counters) and goes into the manifest. With ``parent`` (the
    checkpoint the tables were last saved to or loaded from) and a chain below ``max_chain`` links,
    the checkpoint is *incremental*: each table that tracks its rows writes only those changed
    since (a delta row set) and the manifest's ``chain`` names the checkpoints below it, base
    first; otherwise it is a base (every written row). Once published, the tables' changed rows
    are cleared (`LazyRows.take_changed`). ``extra`` maps more files (paths relative to the checkpoint,
    e.g. ``layout/C3.hot``) to their bytes; they are listed in the manifest with their sha256. ``arrays``
    maps more files to 1-D tensors written a chunk at a time (`write_array_file`; from `detach_arrays`).
    """
    chain = chain_below(parent, max_chain)
    tmp = new_checkpoint_dir(run_dir, step)
    try:
        files, table_meta = {}, []
        # each table's files are fsynced in the background while the next table's rows are read
        with ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="tierec-fsync") as syncs:
            synced = []
            for tname, st in tables.items():
                rel = f"tables/{tname}.tbl"
                for name, entry in write_table_file(tmp / rel, st, delta=bool(chain), sync=False).items():
                    files[f"tables/{name}"] = entry
                    synced.append(syncs.submit(fsync_dir, tmp / "tables" / name))
                table_meta.append(table_entry(tname, st.num_embeddings, st.dim, st.state_dim))
            for f in synced:
                f.result()  # every table file durable before the checkpoint is published
        for rel, data in (extra or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(tmp / rel, data)
            files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        files.update(write_arrays(tmp, arrays or {}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = publish_checkpoint(tmp, step, dense_state, files, table_meta, meta | {"chain": chain}, keep)
    for st in tables.values():
        if (lazy := st.lazy_rows()) is not None:
            lazy.take_changed()
    return final


ARRAY_CHUNK = 1 << 24  # bytes per read or write of an array file


def write_array_file(path: Path, t: torch.Tensor) -> dict:
    """A 1-D tensor's raw bytes (native order) to ``path``, ``ARRAY_CHUNK`` at a time (the pages of a spilled
    tensor leave memory as they are written; the file past the page cache, `SequentialWriter`), fsynced -> its
    manifest entry {bytes, sha256, dtype, numel}."""
    flat = t.reshape(-1)
    step = max(1, ARRAY_CHUNK // max(1, flat.element_size()))
    h, n = hashlib.sha256(), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    f = SequentialWriter(path)
    try:
        for a in range(0, flat.numel(), step):
            part = flat[a : a + step]
            data = part.numpy().tobytes() if part.dtype != torch.bool else part.to(torch.uint8).numpy().tobytes()
            f.write(data)
            h.update(data)
            n += len(data)
            release_pages(part)
        f.close(sync=True)
    finally:
        f.discard()
    return {"bytes": n, "sha256": h.hexdigest(), "dtype": str(flat.dtype).removeprefix("torch."),
            "numel": flat.numel()}


def write_arrays(tmp: Path, arrays: dict[str, torch.Tensor]) -> dict[str, dict]:
    """`write_array_file` for each ``{relative path: tensor}`` under ``tmp`` -> their manifest entries."""
    return {rel: write_array_file(tmp / rel, t) for rel, t in arrays.items()}


class ArrayFile:
    """A checkpoint's array file read a chunk at a time (`tierec.storage.spill.ArraySource`), its size checked
    when opened and its sha256 when the last chunk is read (a mismatch is a `CheckpointError`)."""

    def __init__(self, path: Path, expect: dict):
        self.path, self.expect = path, expect
        try:
            self.dtype = getattr(torch, str(expect["dtype"]))
            self.n = int(expect["numel"])
        except (KeyError, AttributeError, TypeError, ValueError):
            raise CheckpointError(f"{path}: its manifest entry does not describe an array ({expect})") from None
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the checkpoint manifest but missing")
        if path.stat().st_size != expect["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, the manifest says {expect['bytes']}")

    def numel(self) -> int:
        return self.n

    def chunks(self, ranges):
        """(start, end, values) for ``ranges`` covering the array in order."""
        item = torch.empty(0, dtype=self.dtype).element_size()
        h, pos = hashlib.sha256(), 0
        with open(self.path, "rb") as f:
            for a, b in ranges:
                if a != pos:
                    raise CheckpointError(f"{self.path}: read out of order ({a} after {pos})")
                data = f.read((b - a) * item)
                if len(data) != (b - a) * item:
                    raise CheckpointError(f"{self.path}: truncated")
                h.update(data)
                pos = b
                yield a, b, torch.frombuffer(bytearray(data), dtype=torch.uint8 if self.dtype == torch.bool
                                             else self.dtype).to(self.dtype)
        if pos == self.n and h.hexdigest() != self.expect["sha256"]:
            raise CheckpointError(f"{self.path}: sha256 does not match the checkpoint manifest (corrupt file)")


def detach_arrays(state: dict, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A state dict whose ``"arrays"`` (name -> 1-D tensor, O(rows): a dynamic index) go to files of their own:
    (the state naming the files, {relative path: tensor} for ``save_checkpoint(arrays=...)``)."""
    rels = {k: f"arrays/{name}.{k}.bin" for k in state["arrays"]}
    return {**state, "arrays": rels}, {rels[k]: v for k, v in state["arrays"].items()}


def attach_arrays(ckpt: Path, manifest: dict, state: dict) -> dict:
    """The inverse of `detach_arrays` on load: each named file becomes an `ArrayFile`."""
    arrays = {}
    for k, rel in state.get("arrays", {}).items():
        if rel not in manifest["files"]:
            raise CheckpointError(f"{ckpt}: array file {rel} is not in the manifest")
        arrays[k] = ArrayFile(ckpt / rel, manifest["files"][rel])
    return {**state, "arrays": arrays}


def chain_below(parent: Path | None, max_chain: int) -> list[str]:
    """The ``chain`` of a checkpoint written over ``parent``: the parent's chain and the parent, base
    first; [] (a base) without a parent, when the chain would reach ``max_chain`` links, or when the
    parent is unreadable."""
    if parent is None or max_chain <= 1:
        return []
    try:
        below = list(read_manifest(parent).get("chain", []))
    except CheckpointError as e:
        log.warning("checkpoint %s cannot be read (%s); writing a full checkpoint", parent, e)
        return []
    chain = below + [parent.name]
    return chain if len(chain) < max_chain else []


def table_chain(ckpt: Path, manifest: dict) -> list[tuple[Path, dict]]:
    """[(checkpoint dir, manifest)] of ``ckpt``'s chain, base first, ``ckpt`` last; each manifest checked.
    A missing link is a `CheckpointError` naming it."""
    links = []
    for name in manifest.get("chain", []):
        d = ckpt.parent / name
        if not isinstance(name, str) or "/" in name or not d.is_dir():
            raise CheckpointError(f"{ckpt}: its chain names {name!r}, which is not a checkpoint beside it (an "
                                  "incremental checkpoint needs every checkpoint below it: copy them with it, or "
                                  "run `tierec checkpoint compact` on it first)")
        links.append((d, read_manifest(d)))
    return links + [(ckpt, manifest)]


def new_checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """A fresh ``checkpoints/step-N.tmp-*`` directory with an empty ``tables/`` inside."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"step-{step:08d}.tmp-"))
    os.chmod(tmp, 0o777 & ~umask())
    (tmp / "tables").mkdir()
    return tmp


def table_entry(name: str, num_embeddings: int, dim: int, state_dim: int) -> dict:
    return {"name": name, "file": f"tables/{name}.tbl", "num_embeddings": num_embeddings, "dim": dim,
            "state_dim": state_dim, "dtype": "float32"}


def publish_checkpoint(tmp: Path, step: int, dense_state: dict, table_files: dict, table_meta: list, meta: dict,
                       keep: int = 2, name: str | None = None, latest: bool = True) -> Path:
    """Finish a checkpoint whose table files are written (and fsynced) in ``tmp``: write dense.pt and the
    manifest, rename ``tmp`` to ``name`` (default ``step-N``) and, with ``latest``, publish it in LATEST.
    ``table_files`` maps each table file (relative path) to {bytes, sha256, ...}."""
    root = tmp.parent
    name = name or f"step-{step:08d}"
    try:
        files = {}
        buf = io.BytesIO()
        torch.save(dense_state, buf)
        data = buf.getvalue()
        (tmp / "dense.pt").write_bytes(data)
        with open(tmp / "dense.pt", "rb+") as f:
            os.fsync(f.fileno())
        files["dense.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        files.update(table_files)
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files, "tables": table_meta,
                    **meta}
        manifest["manifest_sha256"] = manifest_digest(manifest)
        atomic_write_bytes(tmp / "manifest.json", json.dumps(manifest, indent=2).encode())
        fsync_dir(tmp / "tables")
        if (tmp / "arrays").is_dir():
            fsync_dir(tmp / "arrays")
        fsync_dir(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if latest:
        atomic_write_bytes(root / "LATEST", name.encode())
        _prune(root, keep, keep_name=name)
    log.info("checkpoint %s written", final)
    return final


def _prune(root: Path, keep: int, keep_name: str) -> None:
    """Remove all but the newest ``keep`` checkpoints and the chains below them (a checkpoint whose
    manifest cannot be read keeps every older one: its chain is unknown)."""
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp-" not in p.name)
    kept = {p.name for p in done[-keep:]} | {keep_name}
    for p in done[-keep:]:
        try:
            kept.update(read_manifest(p).get("chain", []))
        except CheckpointError:
            kept.update(q.name for q in done if q.name < p.name)
    for p in done:
        if p.name not in kept:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # leftovers of crashed writes
        if ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run dir, its ``checkpoints`` dir, or one ``step-N`` dir -> the checkpoint dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if (p / "manifest.json").exists() and (p / "dense.pt").exists():
        return p
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    latest = p / "LATEST"
    if latest.exists() or latest.is_symlink():
        return p / _read_latest(latest)
    raise CheckpointError(f"{path}: no checkpoint found (expected a LATEST file or a manifest.json)")


def latest_or_none(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of ``run_dir``, or None when there is none (or LATEST is unreadable)."""
    try:
        return resolve_checkpoint(run_dir)
    except CheckpointError:
        return None


def _read_latest(latest: Path) -> str:
    """The checkpoint name in ``LATEST`` (``step-N``), checked; errors name the newest complete one."""
    newest = sorted(d.name for d in latest.parent.glob("step-*") if d.is_dir() and ".tmp-" not in d.name)
    hint = (f"; the newest checkpoint directory is {latest.parent / newest[-1]}: pass it instead, or write its "
            "name into LATEST") if newest else ""
    if not latest.is_file():
        raise CheckpointError(f"{latest}: is not a regular file (expected the name of the newest checkpoint){hint}")
    try:
        name = latest.read_bytes()[:256].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{latest}: not UTF-8 text (expected a name like step-00000120){hint}") from None
    if not name:
        raise CheckpointError(f"{latest}: empty (expected the name of the newest checkpoint, like step-00000120){hint}")
    if "/" in name or name in (".", "..") or not (latest.parent / name).is_dir():
        raise CheckpointError(f"{latest}: names {name[:64]!r}, which is not a checkpoint directory beside it{hint}")
    return name


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's fields (all but ``manifest_sha256``), over canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(ckpt: Path) -> dict:
    """The manifest of checkpoint directory ``ckpt``, checked: JSON object, format, version, required keys,
    and (version 2) its own fields against ``manifest_sha256``."""
    mpath = ckpt / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: checkpoint manifest is missing")
    try:
        m = json.loads(mpath.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{mpath}: manifest is not UTF-8 text; the checkpoint is corrupt") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}:{e.lineno}: manifest is not valid JSON ({e.msg}); the checkpoint is corrupt") from None
    if not isinstance(m, dict):
        raise CheckpointError(f"{mpath}: manifest is a JSON {type(m).__name__}, expected an object; the checkpoint is corrupt")
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a tierec checkpoint (format={m.get('format')!r})")
    if m.get("version") not in VERSIONS:
        raise CheckpointError(f"{mpath}: checkpoint version {m.get('version')!r} is not supported "
                              f"(this tierec reads {', '.join(map(str, VERSIONS))})")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise CheckpointError(f"{mpath}: manifest lacks {', '.join(missing)}; the checkpoint is incomplete or corrupt")
    if m["version"] >= 2 and m.get("manifest_sha256") != manifest_digest(m):
        raise CheckpointError(f"{mpath}: the manifest's fields do not match its manifest_sha256 (edited or corrupt "
                              "manifest)")
    files = m["files"]
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                              and isinstance(e.get("sha256"), str) for e in files.values()):
        raise CheckpointError(f"{mpath}: 'files' must map each file to {{bytes, sha256}}; the manifest is corrupt")
    return m


def saved_data_path(cfg: dict, ckpt_dir: Path) -> str:
    """A checkpoint's data path: absolute since this version. An older one is relative to the directory
    training ran in, which is the run directory minus ``cfg["out"]`` (``runs/a`` -> two levels up)."""
    data, out = Path(cfg.get("data", "")), Path(cfg.get("out", ""))
    if data.is_absolute() or out.is_absolute() or ".." in out.parts:
        return str(data)
    base = ckpt_dir.resolve().parent.parent  # RUN/checkpoints/step-N -> RUN
    for _ in out.parts:
        base = base.parent
    return str(base / data) if (base / data).exists() else str(data)


def load_dense_state(ckpt: Path, manifest: dict) -> dict:
    """``dense.pt`` of a checkpoint, size and sha256 checked, unpickled with ``weights_only=True``: tensors,
    numbers, strings and containers only. A file holding anything else (a pickled object whose
    ``__reduce__`` would run code) is refused, never executed."""
    path = ckpt / "dense.pt"
    expect = manifest["files"].get("dense.pt")
    if not path.is_file() or expect is None:
        raise CheckpointError(f"{path}: dense state is missing")
    data = path.read_bytes()
    check_bytes(path, data, expect)
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain containers, which "
                              f"could run code when loaded ({first[:200]})") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch file ({str(e).strip()[:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: expected a dict with the model's weights under 'model'")
    return state


def load_tables(ckpt: Path, manifest: dict, tables: dict) -> None:
    """Load the rows of checkpoint ``ckpt`` into ``tables`` (name -> fresh storage): its chain's base,
    then each delta over it, verified as read. Afterwards nothing counts as changed since."""
    chain = table_chain(ckpt, manifest)
    origin = str(ckpt)  # tables that took this checkpoint's rows copy-on-write (`SsdTable.attach`) are skipped
    tables = {n: st for n, st in tables.items() if (lz := st.lazy_rows()) is None or lz.origin != origin}
    for link, m in chain:
        _load_link(link, m, tables)
    for st in tables.values():
        lazy = st.lazy_rows()
        if lazy is not None:
            lazy.take_changed()


def _load_link(ckpt: Path, manifest: dict, tables: dict) -> None:
    by_name = {t["name"]: t for t in manifest["tables"]}
    for tname, st in tables.items():
        t = by_name.get(tname)
        if t is None:
            raise CheckpointError(f"{ckpt}: checkpoint has no table {tname!r} (has {sorted(by_name)})")
        if (t["num_embeddings"], t["dim"], t["state_dim"]) != (st.num_embeddings, st.dim, st.state_dim):
            raise CheckpointError(
                f"{ckpt}: table {tname!r} is {t['num_embeddings']}x{t['dim']}+{t['state_dim']} in the checkpoint "
                f"but {st.num_embeddings}x{st.dim}+{st.state_dim} in the model (different config?)")
        files = manifest["files"]
        if t["file"] not in files:
            raise CheckpointError(f"{ckpt}: table {tname!r}: its file {t['file']} is not in the manifest's files")
        read_table_file(ckpt / t["file"], st, files[t["file"]], files.get(t["file"] + ".ids"))


def verify_checkpoint(ckpt: Path) -> dict:
    """Check every file of checkpoint ``ckpt`` and of the checkpoints its chain needs: manifests, dense
    state, and every table file (row sets chunk by chunk). Returns {links, tables, bytes}; any
    mismatch is a `CheckpointError` naming the file."""
    from tierec.storage.tablefile import verify_table_file

    links = table_chain(ckpt, read_manifest(ckpt))
    nbytes = 0
    for link, m in links:
        load_dense_state(link, m)
        for t in m["tables"]:
            if t["file"] not in m["files"]:
                raise CheckpointError(f"{link}: table {t['name']!r}: its file {t['file']} is not in the manifest")
            verify_table_file(link, m["files"], t["file"], t["num_embeddings"], t["dim"] + t["state_dim"])
        for rel, e in m["files"].items():
            if rel.startswith("arrays/"):
                verify_file(link / rel, e)
        nbytes += sum(e["bytes"] for e in m["files"].values())
    return {"links": [p.name for p, _ in links], "tables": len(links[-1][1]["tables"]), "bytes": nbytes}


def compact_checkpoint(ckpt: Path, keep: int | None = None) -> Path:
    """Fold an incremental checkpoint's chain into one full checkpoint of the same step, named
    ``<name>-full`` beside it: every table's newest rows (a row set of all rows written, or the
    dense file), the same dense state and counters, no chain. Published in LATEST when ``ckpt``
    is the newest checkpoint (then older checkpoints beyond ``keep`` are pruned, and so are chain
    links only it needed). A checkpoint without a chain is returned as it is."""
    from tierec.storage.lazy import LazyRows
    from tierec.storage.ssd import open_table_chain
    from tierec.storage.tablefile import write_row_set

    m = read_manifest(ckpt)
    if not m.get("chain"):
        return ckpt
    chain = [(d, mm["files"]) for d, mm in table_chain(ckpt, m)]
    root = ckpt.parent
    is_latest = latest_or_none(root.parent) == ckpt
    dense = load_dense_state(ckpt, m)
    tmp = new_checkpoint_dir(root.parent, m["step"])
    try:
        files = {}
        for t in m["tables"]:
            top = open_table_chain(chain, t["file"], t["num_embeddings"], t["dim"], t["state_dim"])
            try:
                lazy = top.lazy_rows()
                if lazy is None:  # a full file: copied as it is
                    shutil.copyfile(top.path, tmp / t["file"])
                    files[t["file"]] = dict(m["files"][t["file"]])
                    continue
                union = top.chain_written()
                for name, entry in write_row_set(tmp / t["file"], top, LazyRows(lazy.init, union), union).items():
                    files[f"tables/{name}"] = entry
            finally:
                top.close()
        for rel, e in m["files"].items():  # the dense state's array files: copied as they are
            if rel.startswith("arrays/"):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ckpt / rel, tmp / rel)
                files[rel] = dict(e)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = {k: v for k, v in m.items() if k not in ("format", "version", "step", "files", "tables", "manifest_sha256")}
    meta["chain"] = []
    meta["compacted_from"] = ckpt.name
    final = publish_checkpoint(tmp, m["step"], dense, files, m["tables"], meta,
                               keep if keep is not None else len(m["chain"]) + 2, name=f"{ckpt.name}-full",
                               latest=is_latest)
    log.info("checkpoint %s: %d links folded into %s", ckpt, len(chain), final)
    return final

