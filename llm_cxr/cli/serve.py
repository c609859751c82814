"""``llm-cxr serve``: the web app for a trained model (needs ``pip install 'llm-cxr[web]'``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="web app: X-ray -> report, report -> X-ray, questions about an X-ray",
                       description="Serve a trained model in the browser (Gradio). Binds 127.0.0.1 unless told "
                                   "otherwise; the app has no login, so only bind a wider address behind your "
                                   "own access control. Requests are queued and run one at a time.")
    p.add_argument("--model", required=True, type=Path, help="trained run folder (from `llm-cxr train`) or RUN/model")
    p.add_argument("--vqgan", type=Path, help="VQ-GAN run (default: the one recorded with the model)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cpu (default cpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest accepted upload in MB (default 10)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait while one runs; more are refused with a message (default 64)")
    p.add_argument("--rate-per-minute", type=int, default=30,
                   help="requests one client may send a minute; more get a message to wait (default 30; 0: no limit)")
    from llm_cxr.explain import METHODS

    p.add_argument("--explain", default="m2ib", choices=[*sorted(METHODS), "none"],
                   help="method of the per-sentence maps on the report tab (default m2ib, a few seconds a sentence "
                        "on a CPU; none turns them off)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from llm_cxr.webapp import serve

    app = serve(args.model, host=args.host, port=args.port, vqgan=args.vqgan, device=args.device,
                max_upload_mb=args.max_upload_mb, max_queue=args.max_queue, block=False,
                rate_per_minute=args.rate_per_minute,
                explain=None if args.explain == "none" else args.explain)
    print(f"serving {args.model} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        while app.is_running:
            time.sleep(0.2)
    finally:
        app.close()
    return 0
