"""One row of a server system (our bots, grammY): its processes started, the workload delivered over HTTP on
loopback as Telegram delivers it, their CPU, the database's and the load generator's measured during the
load only, and the answers checked after it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import time
from asyncio.subprocess import DEVNULL
from pathlib import Path
from typing import Any

from answers import handler_runs, verify
from process_tree import cpu_seconds, database_server, peak_rss_mb
from report import ms, per_update_us
from systems import System, server
from workloads import Workload, make_updates

from bot.testing.delivery import DeliveryStats, LoopbackHttp, deliver
from bot.testing.env import SECRET
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess

# py-spy installed in this interpreter's environment (pip install py-spy), else on PATH.
PY_SPY = (
    shutil.which(
        "py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    or "py-spy"
)


async def run_server(
    w: Workload,
    system: System,
    dsn: str,
    root: str,
    fake: FakeTelegram,
    processes: int,
    logs: Path,
    profile: Path | None = None,
) -> dict[str, Any]:
    command, env, cwd = server(system, dsn, root)
    name = re.sub(r"[^\w.=-]+", "_", system.label)
    bots = [
        BotProcess(env, logs / f"{w.name}-{name}-{i}.log", command=command, cwd=cwd) for i in range(processes)
    ]
    try:
        for bot in bots:
            bot.wait_ready()
        pids = [bot.proc.pid for bot in bots]
        urls = [bot.url + "/webhook" for bot in bots]
        turn = iter(range(10**9))
        updates, expected = make_updates(w)
        handled = sum(expected.chats.values())  # updates a handler takes: the 🍕 ones
        client = LoopbackHttp()
        try:
            for url in urls:  # as many connections as requests in flight (a redelivery overlaps its first)
                await client.open(url, w.in_flight * (2 if w.duplicate_share else 1))
            spies = []
            if profile is not None and system.kind != "grammy":
                # py-spy attached for the load only: start-up and the /hunger check stay out of it.
                for n, pid in enumerate(pids):
                    out = profile / f"{w.name}-{name}-{n}.txt"
                    spy = (PY_SPY, "record", "--pid", str(pid), "--rate", "1000", "--format", "raw")
                    spies.append(
                        await asyncio.create_subprocess_exec(
                            *spy, "--nonblocking", "-o", str(out), stdout=DEVNULL, stderr=DEVNULL
                        )
                    )
                await asyncio.sleep(1.0)  # py-spy attaches
            db = await database_server(dsn)
            cpu_before, db_before, load_before = cpu_seconds(pids), cpu_seconds(db), time.process_time()
            stats: DeliveryStats = await deliver(
                client,
                lambda: urls[next(turn) % len(urls)],
                SECRET,
                updates,
                in_flight=w.in_flight,
                one_per_chat=w.one_per_chat,
                duplicate_share=w.duplicate_share,
                give_up_after=600,
            )
            cpu = cpu_seconds(pids) - cpu_before
            db_cpu = cpu_seconds(db) - db_before if db else None
            load_cpu = time.process_time() - load_before
            for running in spies:  # py-spy writes its file when it stops
                running.send_signal(signal.SIGINT)
                await running.wait()
            runs = await handler_runs(client, urls, fake) if system.kind == "bot2" else None
            lost, extra = await verify(client, urls[0], fake, expected, per_user=system.kind == "bot2")
            rss = peak_rss_mb(pids)
        finally:
            await client.aclose()
    finally:
        for bot in bots:
            bot.close()
    return {
        "workload": w.name,
        "system": system.label,
        "updates": len(updates),
        "updates/s": round(stats.delivered / stats.elapsed),
        "p50 ms": ms(stats.percentile(50)),
        "p99 ms": ms(stats.percentile(99)),
        "redelivered": stats.redelivered,
        "non-2xx": sum(n for code, n in stats.statuses.items() if not 200 <= code < 300),
        "lost": lost,
        "extra": extra,
        "CPU µs/update": round(cpu / stats.delivered * 1e6),
        "DB CPU µs/update": per_update_us(db_cpu, stats.delivered),
        "load CPU µs/update": per_update_us(load_cpu, stats.delivered),
        "peak RSS MB": f"{rss:.1f}",
        "runs/handled": "-" if runs is None else f"{runs / handled:.3f}",
    }
