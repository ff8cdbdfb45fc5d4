"""Serving exports: a training checkpoint's weights in a row dtype, for `tierec serve` (`tierec export`).

Layout of an export directory::

    EXPORT/
      export.json          format "tierec-export", version, row_dtype, step, the source checkpoint (path and
                           manifest_sha256), config and schema (what serving builds the model from), the
                           data set's absolute path, tables [{name, file, num_embeddings, dim, row_dtype,
                           row_bytes}], files {relative path: {bytes, sha256, ...}} and manifest_sha256 (the
                           sha256 of the other fields, as checkpoints have)
      dense.pt             {"model": the dense weights} (torch.save of tensors only: loaded with
                           weights_only=True; no optimizer state, no RNG), and with dynamic tables
                           "id_maps": the ID index's state as the checkpoint saved it
      tables/<name>.rows   the table's weights, one packed row per ID in the row dtype
                           (`tierec.storage.quantized`: fp32 | fp16 | bf16 | int8 | int4), one sha256 per
                           chunk of 1M rows; no optimizer state
      arrays/*.bin         dynamic tables: the ID index's arrays (raw ID -> row), copied from the checkpoint
                           and checked against its sha256 on the way (`tierec.train.checkpoint.ArrayFile`)

`write_export` streams every table from the checkpoint (its chain, row sets and initial values resolved by
`tierec.storage.ssd.open_table_chain`, verified against the manifest first) `READ_ROWS` rows at a time:
memory stays bounded whatever the table's size. It writes into ``EXPORT.tmp-*`` beside the target, fsyncs
every file and the directories, then renames it into place: an interrupted export leaves nothing behind
(and an existing directory is replaced only with ``overwrite``). `read_export_manifest` checks the manifest
(format, version, its own sha256); the files are checked as they are loaded
(`tierec.inference.quantized.load_export`).

Dynamic tables travel with their ID index: serving an export looks raw IDs up in it exactly as serving the
checkpoint does (an unknown or evicted ID reads the default row). Not exported (refused with one line):
sasrec checkpoints (served from DRAM, `tierec serve CHECKPOINT`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tierec.errors import CheckpointError, ConfigError
from tierec.fsio import atomic_write_bytes, fsync_dir, umask
from tierec.storage.quantized import ROW_DTYPES, RowCodec, RowFileWriter
from tierec.train import checkpoint as ckpt

log = logging.getLogger(__name__)

FORMAT = "tierec-export"
VERSION = 1
MANIFEST = "export.json"
READ_ROWS = 1 << 16  # rows per read of a checkpoint table while exporting
MODELS = ("dlrm", "dcnv2", "two-tower", "mmoe", "ple")  # what an export can hold (ranking / retrieval models)
FP16_MAX = 65504.0


def is_export(path: str | os.PathLike) -> bool:
    """True if ``path`` is a serving export directory (holds ``export.json``)."""
    return (Path(path) / MANIFEST).is_file()


def write_export(checkpoint: str | os.PathLike, out: str | os.PathLike, row_dtype: str, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Export checkpoint ``checkpoint`` (a run, checkpoints or step directory) to directory ``out`` with its
    tables in ``row_dtype`` (module doc). Returns the manifest written."""
    if row_dtype not in ROW_DTYPES:
        raise ConfigError(f"--row-dtype must be one of {', '.join(ROW_DTYPES)}, got {row_dtype!r}")
    src = ckpt.resolve_checkpoint(checkpoint)
    m = ckpt.read_manifest(src)
    cfg = m["config"] if isinstance(m.get("config"), dict) else {}
    model = cfg.get("model", "dlrm")
    if model not in MODELS:
        raise ConfigError(f"{src}: a {model!r} checkpoint cannot be exported (exports hold {', '.join(MODELS)} "
                          "models); serve the checkpoint itself")
    dynamic = _dynamic_tables(src, m)
    dest = Path(out)
    if dest.exists() and not overwrite:
        raise ConfigError(f"{dest}: already exists; pass --overwrite to replace it")
    if dest.exists() and not is_export(dest) and any(dest.iterdir()):
        raise ConfigError(f"{dest}: exists and is not an export; refusing to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{dest.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        (tmp / "tables").mkdir()
        manifest = _write(src, m, tmp, row_dtype, progress, dynamic)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (step %d) to %s as %s", src, m["step"], dest, row_dtype)
    return manifest


def _dynamic_tables(src: Path, m: dict) -> list[str]:
    """The checkpoint's dynamic tables (their ID index travels with the export); [] when it has none."""
    from tierec.data.dataset import Schema
    from tierec.train.config import TrainConfig

    try:
        cfg = TrainConfig(**{**m["config"], "data": m["config"].get("data") or "."})
        maps = cfg.id_maps(Schema.from_json(m["schema"]))
    except TypeError as e:
        raise CheckpointError(f"{src}/manifest.json: its config does not fit this tierec ({e})") from None
    if maps.index is not None and cfg.model == "two-tower":
        raise ConfigError(f"{src}: a two-tower model over dynamic tables cannot be served, so not exported")
    return list(maps.dynamic) if maps.index is not None else []


def _copy_array(src: Path, tmp: Path, rel: str, expect: dict) -> None:
    """Checkpoint array file ``rel`` copied into the export, its sha256 checked against ``expect`` on the way."""
    h = hashlib.sha256()
    dest = tmp / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(src / rel, "rb") as f, open(dest, "wb") as g:
            while data := f.read(ckpt.ARRAY_CHUNK):
                h.update(data)
                g.write(data)
            g.flush()
            os.fsync(g.fileno())
    except FileNotFoundError:
        raise CheckpointError(f"{src / rel}: listed in the checkpoint manifest but missing") from None
    if h.hexdigest() != expect.get("sha256"):
        raise CheckpointError(f"{src / rel}: sha256 does not match the checkpoint manifest (corrupt)")


def _write(src: Path, m: dict, tmp: Path, row_dtype: str, progress: bool, dynamic: list[str]) -> dict:
    from tqdm import tqdm

    from tierec.storage.ssd import open_table_chain

    cfg = m["config"]
    files: dict[str, dict] = {}
    tables = []
    chain = [(d, mm["files"]) for d, mm in ckpt.table_chain(src, m)]
    total = sum(int(t["num_embeddings"]) for t in m["tables"])
    with tqdm(total=total, unit="row", unit_scale=True, desc=f"export {row_dtype}", leave=False,
              disable=None if progress else True) as bar:
        for t in m["tables"]:
            n, dim, state_dim = int(t["num_embeddings"]), int(t["dim"]), int(t["state_dim"])
            codec = RowCodec(row_dtype, dim)
            rel = f"tables/{t['name']}.rows"
            table = open_table_chain(chain, t["file"], n, dim, state_dim, verify=True)
            writer = RowFileWriter(tmp / rel, codec, n)
            try:
                for a in range(0, n, READ_ROWS):
                    b = min(a + READ_ROWS, n)
                    w, _ = table.read_rows(a, b)
                    _check_rows(src, t["name"], a, w, row_dtype)
                    writer.add(w)
                    bar.update(b - a)
                files[rel] = writer.finish()
            finally:
                writer.close()
                table.close()
            tables.append({"name": t["name"], "file": rel, "num_embeddings": n, "dim": dim, "row_dtype": row_dtype,
                           "row_bytes": codec.row_bytes})
    fsync_dir(tmp / "tables")
    dense = ckpt.load_dense_state(src, m)
    payload = {"model": dense["model"]}
    if dynamic:
        state = dense.get("id_maps") or {}
        if not state:
            raise CheckpointError(f"{src}: dynamic tables ({', '.join(dynamic)}) but no ID index in dense.pt")
        for rel in state.get("arrays", {}).values():
            if isinstance(rel, torch.Tensor):  # an index saved inside dense.pt (before array files)
                continue
            if not isinstance(rel, str) or rel not in m["files"]:
                raise CheckpointError(f"{src}: array file {rel} is not in the manifest")
            _copy_array(src, tmp, rel, m["files"][rel])
            files[rel] = dict(m["files"][rel])
        payload["id_maps"] = state
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    atomic_write_bytes(tmp / "dense.pt", data)
    files["dense.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": FORMAT, "version": VERSION, "row_dtype": row_dtype, "step": int(m["step"]),
                "source": {"checkpoint": str(src.resolve()), "manifest_sha256": m.get("manifest_sha256")},
                "config": {**cfg, "data": ckpt.saved_data_path(cfg, src)}, "schema": m["schema"],
                "tables": tables, "files": files}
    manifest["manifest_sha256"] = ckpt.manifest_digest(manifest)
    atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
    fsync_dir(tmp)
    return manifest


def _check_rows(src: Path, name: str, start: int, w: torch.Tensor, row_dtype: str) -> None:
    """Rows that the dtype cannot hold are refused (a non-finite weight; fp16: beyond +-65504)."""
    bad = ~torch.isfinite(w).all(1)
    if row_dtype == "fp16":
        bad |= w.abs().amax(1) > FP16_MAX
    if bool(bad.any()):
        r = start + int(bad.nonzero()[0])
        what = "a non-finite weight" if not bool(torch.isfinite(w[r - start]).all()) else \
            f"a weight beyond fp16's range (+-{FP16_MAX:g}); export it as bf16 or fp32"
        raise CheckpointError(f"{src}: table {name!r} row {r} holds {what}")


def read_export_manifest(path: str | os.PathLike) -> dict:
    """The manifest of export directory ``path``, checked: JSON object, format, version, its own fields against
    ``manifest_sha256``, the keys serving needs."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: export manifest is missing")
    try:
        m = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: export manifest is not valid JSON text ({e}); the export is corrupt") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a tierec export")
    if m.get("version") != VERSION:
        raise CheckpointError(f"{mpath}: export version {m.get('version')!r} is not supported (this tierec reads "
                              f"{VERSION})")
    if m.get("manifest_sha256") != ckpt.manifest_digest(m):
        raise CheckpointError(f"{mpath}: the manifest's fields do not match its manifest_sha256 (edited or corrupt)")
    missing = [k for k in ("row_dtype", "step", "config", "schema", "tables", "files") if k not in m]
    if missing:
        raise CheckpointError(f"{mpath}: manifest lacks {', '.join(missing)}; the export is corrupt")
    if m["row_dtype"] not in ROW_DTYPES:
        raise CheckpointError(f"{mpath}: row dtype {m['row_dtype']!r} is not one of {', '.join(ROW_DTYPES)}")
    return m
