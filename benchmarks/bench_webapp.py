"""Web app latency under concurrent users (issue 5: `llm-cxr serve`).

    python benchmarks/bench_webapp.py --model runs/lm-small-s2 [--clients 1,8] [--requests 8] [--device cpu]

Starts `llm-cxr serve` as its own process on a free loopback port, then for each client count
C runs C threads, each with its own `gradio_client.Client`, sending REQUESTS requests one
after the other, cycling through the app's three tabs (X-ray -> report, report -> X-ray,
question; uploads included; `--tabs report` for reports only). The app runs one model call at a time and
queues the rest, so latency grows with C while throughput stays that of the model: the table
shows p50/p90/p99 latency per request, requests per second, and any errors. Traffic stays on
127.0.0.1; every loop is bounded by --requests and --timeout.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TABS = ("report", "image", "answer")  # the app's three tabs, by their API names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args, port: int) -> subprocess.Popen:
    # every client of this benchmark is 127.0.0.1, one "client" to the per-client rate limit: it is turned off
    cmd = [sys.executable, "-m", "llm_cxr", "-q", "serve", "--model", str(args.model), "--port", str(port),
           "--device", args.device, "--max-queue", str(max(64, 2 * max(args.clients))), "--rate-per-minute", "0",
           "--explain", args.explain]
    if args.vqgan:
        cmd += ["--vqgan", str(args.vqgan)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_until_up(proc: subprocess.Popen, port: int, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not start within {timeout:.0f} s")


def _peak_mb(pid: int) -> float | None:
    """The server process's peak resident memory so far (Linux), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _test_image(folder: Path, size: int = 512, variant: int = 0) -> Path:
    """A chest-X-ray-sized grey PNG (the app resizes it as in training). Each ``variant`` differs in one pixel, so
    that every request uploads a file of its own, as real users do: Gradio stores identical uploads at one path,
    and the app deletes an upload once it has read it."""
    from PIL import Image

    yy, xx = np.mgrid[:size, :size] / size
    lungs = np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + \
        np.exp(-(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    pixels = (255 * (1 - 0.7 * lungs)).astype(np.uint8)
    pixels.flat[variant % pixels.size] ^= 1 + variant // pixels.size % 255
    path = folder / f"bench_{variant}.png"
    Image.fromarray(pixels).save(path)
    return path


def _bomb(folder: Path) -> Path:
    """A 200-byte PNG whose header claims 13000 x 13000 16-bit pixels (decoded, 2.7 GB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = folder / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 16, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))
    return path


def _client_loop(url: str, images: list[Path], n: int, deadline: float, lat: list, errors: list,
                 bomb: Path | None = None, refused: list | None = None, tabs: tuple[str, ...] = TABS,
                 offset: int = 0) -> None:
    """``n`` requests, cycling through ``tabs`` from ``offset`` (so that clients mix them at any moment)."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    if bomb is not None:  # one hostile upload first: it must come back as a message, and cost no memory
        try:
            _s, report, _g, status = client.predict(handle_file(str(bomb)), api_name="/report")
            (refused if status.startswith("⚠") and not report else errors).append(status or "bomb accepted")
        except Exception as e:  # noqa: BLE001
            errors.append(f"bomb: {type(e).__name__}: {e}")
    for i in range(n):
        image, tab = images[i % len(images)], tabs[(offset + i) % len(tabs)]
        if time.time() > deadline:
            errors.append("deadline")
            return
        t0 = time.perf_counter()
        try:
            answer, status = _request(client, tab, image, i)
        except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
            errors.append(f"{tab}: {type(e).__name__}: {e}")
            continue
        if status or not answer:
            errors.append(f"{tab}: {status or 'empty answer'}")
        else:
            lat.append((tab, time.perf_counter() - t0))


REPORTS = ["FINDINGS: Small left pleural effusion. No pneumothorax.", "FINDINGS: The lungs are clear.",
           "FINDINGS: Right upper lobe consolidation. Heart size is normal."]
QUESTIONS = ["Is there a pleural effusion?", "Is there a pneumothorax?", "Which side is the consolidation on?"]


def _request(client, tab: str, image: Path, i: int) -> tuple[object, str]:
    """One request of one tab; (what came back, the status line: empty when all went well)."""
    from gradio_client import handle_file

    if tab == "report":
        _seen, report, _gallery, status = client.predict(handle_file(str(image)), api_name="/report")
        return report, status
    if tab == "image":
        drawn, _words, status = client.predict(REPORTS[i % len(REPORTS)], 1.0, i, api_name="/image")
        return drawn, status
    _seen, answer, status = client.predict(handle_file(str(image)), QUESTIONS[i % len(QUESTIONS)],
                                           api_name="/answer")
    return answer, status


def run_load(url: str, folder: Path, clients: int, requests: int, timeout: float, bomb: Path | None = None,
             bombers: int = 0, tabs: tuple[str, ...] = TABS) -> dict:
    lat: list[tuple[str, float]] = []
    errors: list[str] = []
    refused: list[str] = []
    deadline = time.time() + timeout
    start = int(time.time() * 1000) % 100_000  # new files at each level too
    images = [[_test_image(folder, variant=start + c * requests + r) for r in range(requests)] for c in range(clients)]
    threads = [threading.Thread(target=_client_loop, args=(url, images[i], requests, deadline, lat, errors,
                                                           bomb if i < bombers else None, refused, tabs, i))
               for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    every = [t for _, t in lat]
    q = np.percentile(every, [50, 90, 99]) if every else [float("nan")] * 3
    row = {"clients": clients, "requests": clients * requests, "ok": len(lat), "errors": len(errors),
           "bombs_sent": min(bombers, clients), "bombs_refused": len(refused),
           "p50_s": float(q[0]), "p90_s": float(q[1]), "p99_s": float(q[2])}
    for tab in tabs:  # each tab's own median: a drawing costs more than an answer
        mine = [t for k, t in lat if k == tab]
        row[f"{tab}_ok"] = len(mine)
        row[f"{tab}_p50_s"] = float(np.median(mine)) if mine else float("nan")
    return {**row, "throughput_rps": len(lat) / wall, "wall_s": wall, "first_error": errors[0] if errors else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "runs" / "lm-small-s2", help="trained run folder")
    ap.add_argument("--vqgan", type=Path, help="VQ-GAN run (default: the one recorded with the model)")
    ap.add_argument("--device", default="cpu", help="device of the server (default cpu)")
    ap.add_argument("--clients", default="1,8", help="comma-separated concurrent client counts (default 1,8)")
    ap.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    ap.add_argument("--tabs", default=",".join(TABS),
                    help=f"the tabs each client cycles through (default {','.join(TABS)})")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per load level before giving up (default 900)")
    ap.add_argument("--bombers", type=int, default=2, help="clients that first upload a decompression bomb (default 2)")
    ap.add_argument("--explain", default="m2ib", help="the server's --explain (default m2ib, as served; none: off)")
    ap.add_argument("--no-save", action="store_true", help="print the table only; write no results (smoke tests)")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.tabs = tuple(t.strip() for t in args.tabs.split(",") if t.strip())
    if not args.tabs or set(args.tabs) - set(TABS):
        print(f"--tabs takes some of {', '.join(TABS)}; got {args.tabs}", file=sys.stderr)
        return 2
    if not args.model.exists():
        print(f"no model at {args.model}: train one (training/lm_small.sh) or pass --model RUN", file=sys.stderr)
        return 2
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = _start_server(args, port)
    try:
        _wait_until_up(proc, port, timeout=600)
        with tempfile.TemporaryDirectory() as tmp:
            run_load(url, Path(tmp), 1, len(args.tabs), args.timeout, tabs=args.tabs)  # warm-up: lazy initialisation
            bomb = _bomb(Path(tmp))
            rows = []
            for c in args.clients:
                rows.append(run_load(url, Path(tmp), c, args.requests, args.timeout, bomb, args.bombers, args.tabs))
                rows[-1]["server_peak_mb"] = _peak_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    table = [{k: v for k, v in r.items() if k not in ("first_error", "wall_s")} for r in rows]
    notes = (f"Model `{args.model}` on {args.device}, explanations `{args.explain}`; each client cycles through the "
             f"tabs {', '.join(args.tabs)} (X-ray -> report, greedy, up to 160 tokens; report -> X-ray, guidance 1, "
             "seeded; X-ray + question -> answer) through the Gradio API over loopback, uploads included; one model "
             f"call at a time, the rest queued. {args.bombers} clients per level first upload a 200-byte PNG claiming "
             "13000x13000 16-bit pixels (bombs_refused: answered with a message); server_peak_mb: the server's peak "
             "resident memory so far.")
    if args.no_save:
        from common import md_table

        print(md_table(table))
        for r in rows:
            if r["first_error"]:
                print(f"clients={r['clients']}: first error: {r['first_error']}")
        return 0
    write_results("webapp", "Web app: latency of its three tabs under concurrent users",
                  {"model": str(args.model), "device": args.device, "rows": rows}, [("", table)], notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
