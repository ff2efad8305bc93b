"""A drcov v2 reader written from DynamoRIO's description of the format, for tests."""

from __future__ import annotations

import re
import struct


def read_drcov(path) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """A drcov v2 reader: the header lines, the module table (columns named by its Columns line),
    then "BB Table: N bbs" and N packed {u32 start; u16 size; u16 mod_id}."""
    data = open(path, "rb").read()
    lines = data.split(b"\n")
    assert lines[0] == b"DRCOV VERSION: 2" and lines[1] == b"DRCOV FLAVOR: drcov"
    count = int(re.match(rb"Module Table: version 2, count (\d+)", lines[2]).group(1))
    columns = [c.strip() for c in lines[3].decode().removeprefix("Columns:").split(",")]
    modules = []
    for line in lines[4 : 4 + count]:
        values = [v.strip() for v in line.decode().split(",", len(columns) - 1)]
        modules.append(dict(zip(columns, values)))
    table = lines[4 + count]
    bbs = int(re.match(rb"BB Table: (\d+) bbs", table).group(1))
    offset = sum(len(line) + 1 for line in lines[: 5 + count])
    body = data[offset:]
    assert len(body) == 8 * bbs
    return modules, [struct.unpack_from("<IHH", body, 8 * i) for i in range(bbs)]
