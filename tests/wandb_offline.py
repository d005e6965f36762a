"""Read back an offline W&B run (`run-ID.wandb`) without a server: history, config and
the artifacts it logged (a table with media is one: its files are staged outside the run
folder until `wandb sync` uploads them).

The file is a LevelDB-style log (the format of wandb's own datastore): a 7-byte header,
then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type) and a
protobuf `Record` payload split into FULL / FIRST, MIDDLE..., LAST pieces.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK, _HEADER = 32 * 1024, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_offline_run(run_file: str | Path) -> dict:
    """{'run_id', 'history': [{key: value}], 'config': {key: value},
    'artifacts': [{'name', 'type', 'files': {path in the artifact: local file}}]}."""
    run_id, history, config, artifacts = None, [], {}, []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "artifact":
            artifact = record.artifact
            artifacts.append({"name": artifact.name, "type": artifact.type,
                              "files": {e.path: e.local_path for e in artifact.manifest.contents}})
    return {"run_id": run_id, "history": history, "config": config, "artifacts": artifacts}
