#!/usr/bin/env python3
"""The approvals test's held statements through asyncpg (the extended protocol: the hold
is at the Bind, with its values): a DELETE inside a transaction that the test approves
(the transaction then commits), and one it denies (the client gets 42501, its
transaction is rolled back, the connection goes on).

usage: asyncpg_hold.py PORT
Prints what happened, one line per step, then "done".
"""

import asyncio
import sys

import asyncpg


async def main(port):
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres",
                                 database="postgres")
    notices = []
    conn.add_log_listener(lambda c, m: notices.append(m.message))
    async with conn.transaction():
        await conn.execute("UPDATE accounts SET note = 'touched' WHERE id = $1", 3)
        status = await conn.execute("DELETE FROM accounts WHERE id = $1", 1)
        print("approved", status, flush=True)
    try:
        async with conn.transaction():
            await conn.execute("UPDATE accounts SET note = 'rolled back' WHERE id = $1", 3)
            await conn.execute("DELETE FROM accounts WHERE id = $1", 2)
        sys.exit("a denied DELETE ran")
    except asyncpg.exceptions.InsufficientPrivilegeError as e:
        print("denied", e.sqlstate, e.args[0], flush=True)
    row = await conn.fetchrow("SELECT count(*) AS n, max(note) AS note FROM accounts")
    print("after", row["n"], row["note"], flush=True)
    print("notices", len(notices), "|".join(notices), flush=True)
    await conn.close()
    print("done", flush=True)


asyncio.run(main(int(sys.argv[1])))
