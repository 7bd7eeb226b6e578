"""``diffstudio serve``: run the HTTP API (docs/server.md)."""

from __future__ import annotations

import logging

from diffstudio.errors import MissingExtraError

log = logging.getLogger("diffstudio.server")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="run the HTTP API: A1111-compatible /sdapi/v1 and diffstudio's /v1",
                           description="Serves the packaged demo model unless --models names a folder of "
                                       "checkpoints (A1111 layout understood: Lora/, ControlNet/). docs/server.md")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 = every network, "
                            "use --token then)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--models", help="a folder of checkpoints, LoRAs and ControlNets (default: the demo model)")
    serve.add_argument("--outputs", default="outputs", help="where images and job files are written")
    serve.add_argument("--queue-size", type=int, default=8, help="jobs that may wait; more are answered 429")
    serve.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every request")
    serve.add_argument("--max-pixels", type=int, default=2048 * 2048, help="largest width x height accepted")
    serve.add_argument("--loaded-models", type=int, default=1, help="models kept in memory (least recently used "
                                                                     "dropped)")
    serve.add_argument("--no-ui", action="store_true", help="the HTTP API only, no web UI at /ui")
    serve.add_argument("--annotators", help="the folder of annotator weight files (lllyasviel/Annotators) that the "
                                            "hed, lineart_*, depth, openpose, normal, mlsd and pidinet annotators "
                                            "read (default: $DIFFSTUDIO_ANNOTATORS)")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from diffstudio.server.app import create_app
    except ImportError as err:
        raise MissingExtraError(f"`diffstudio serve` needs the server extra ({err.name} is missing): "
                                'pip install "diffstudio[server]"') from None
    if args.host not in LOOPBACK and not args.token:
        log.warning("listening on %s without --token: anyone who can reach this address can use the server",
                    args.host)
    if args.annotators:
        import os

        from diffstudio.control.names import ANNOTATORS_ENV

        os.environ[ANNOTATORS_ENV] = args.annotators  # read by every annotator that needs a file
    ui = None
    if not args.no_ui:
        from diffstudio.webui import UI_PATH, gradio_available, mount_ui

        if gradio_available():
            ui = mount_ui
            log.info("web UI at http://%s:%s%s/", args.host, args.port, UI_PATH)
        else:
            log.warning('no web UI: it needs gradio (pip install "diffstudio[webui]"); serving the HTTP API only')
    app = create_app(args.models, args.outputs, args.queue_size, args.token, max_pixels=args.max_pixels,
                     loaded_models=args.loaded_models, ui=ui)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
