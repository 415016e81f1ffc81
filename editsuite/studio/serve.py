"""`editsuite serve`: check the port and the model, then run the studio on uvicorn until Ctrl-C."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Callable

from editsuite.errors import UserError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is a one-line error before anything loads."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host!r} ({e.strerror}); pass an address of this machine with --host") \
            from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None
    sock.listen(64)
    return sock


def run_server(*, model: str | None, host: str, port: int, output: Path, max_pixels: int, load_options: dict,
               say: Callable[[str], None]) -> None:
    import uvicorn

    from editsuite.studio.server import Studio, create_app

    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535 (got {port})")
    sock = bind(host, port)
    try:
        if not is_loopback(host):
            say(f"warning: listening on {host}: anyone who can reach this machine can use the studio and read its "
                "outputs")
        studio = Studio(output, model=model, max_pixels=max_pixels, load_options=load_options)
        hosts = ("*",) if not is_loopback(host) else (host.strip("[]"),)
        shown = f"[{host}]" if ":" in host else host
        say(f"editsuite studio: http://{shown}:{sock.getsockname()[1]}  (results in {output}; Ctrl-C stops it)")
        server = uvicorn.Server(uvicorn.Config(create_app(studio, hosts), log_level="warning", lifespan="off"))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn stops cleanly on Ctrl-C, then raises it again
            pass
        finally:
            studio.close()
    finally:
        sock.close()
