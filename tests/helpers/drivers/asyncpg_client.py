#!/usr/bin/env python3
"""The drivers test's workload through asyncpg (its own protocol implementation in Cython:
named prepared statements made with Parse/Describe/Sync, binary parameters and results,
executemany pipelined without a Sync per row).

usage: asyncpg_client.py PORT APP SECRET
Prints one line per step and "done". SECRET is a marker the auditor must never record.
"""

import asyncio
import os
import sys

import asyncpg


async def main(port, app, secret):
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user="postgres", database="postgres",
        server_settings={"application_name": app},
        ssl=os.environ.get("AUDITOR_TEST_SSL") or False,
    )
    await conn.execute("DROP TABLE IF EXISTS drv_asyncpg")
    await conn.execute("CREATE TABLE drv_asyncpg (id int PRIMARY KEY, name text, secret text)")
    await conn.executemany(
        "INSERT INTO drv_asyncpg VALUES ($1, $2, $3)",
        [(i, f"name {i}", f"{secret}-{i}") for i in range(50)],
    )
    print("executemany", flush=True)
    stmt = await conn.prepare("SELECT name FROM drv_asyncpg WHERE id = $1")
    for i in range(20):
        assert await stmt.fetchval(i) == f"name {i}"
    print("prepared", flush=True)
    rows = await conn.fetch("SELECT repeat('x', 1000) AS r FROM generate_series(1, 2000)")
    assert len(rows) == 2000
    try:
        await conn.fetch("SELECT * FROM drv_missing_table WHERE id = $1", 1)
        sys.exit("no error from a missing table")
    except asyncpg.exceptions.UndefinedTableError:
        print("error", flush=True)
    try:
        async with conn.transaction():
            await conn.execute("UPDATE drv_asyncpg SET name = $1 WHERE id = $2", "renamed", 1)
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert await conn.fetchval("SELECT name FROM drv_asyncpg WHERE id = 1") == "name 1"
    big = "y" * 100_000
    assert await conn.fetchval("SELECT length($1::text)", big + secret) == 100_000 + len(secret)
    await conn.close()
    print("done", flush=True)


asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
