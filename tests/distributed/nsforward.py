"""Make the root namespace's 127.0.0.1:<port> reachable as 127.0.0.1:<port> inside network namespaces.

The sandbox (Entra stand-in, Dovecot, Postfix, Graph stand-in) and the tests' counting proxies
listen on the root namespace's loopback; each test host has a loopback of its own. This process
stays in the root namespace, opens one listening socket per (namespace, port) *inside* that
namespace (``setns`` on the main thread, before any other thread starts, then back), and relays
each accepted connection to 127.0.0.1:<port> here. Clients still connect to 127.0.0.1, so the
sandbox's certificate (127.0.0.1, localhost) verifies unchanged; the sandbox is not reconfigured.

Usage (root): python nsforward.py --netns NAME [--netns NAME ...] --port P [--port P ...]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import selectors
import signal
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_in(netns: str, port: int) -> socket.socket:
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        setns(target)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(512)
        return sock
    finally:
        setns(home)
        os.close(target)
        os.close(home)


def relay(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    pairs = {client: upstream, upstream: client}
    sel = selectors.DefaultSelector()
    for sock in pairs:
        sel.register(sock, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in sel.select():
                data = key.fileobj.recv(65536)
                if not data:
                    return
                pairs[key.fileobj].sendall(data)
    except OSError:
        return
    finally:
        for sock in pairs:
            sock.close()


def serve(listener: socket.socket, port: int) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client, port), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--netns", action="append", required=True)
    parser.add_argument("--port", action="append", type=int, required=True)
    args = parser.parse_args()
    listeners = [(listen_in(ns, port), port) for ns in args.netns for port in args.port]  # main thread only
    for listener, port in listeners:
        threading.Thread(target=serve, args=(listener, port), daemon=True).start()
    print("nsforward: ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    sys.exit(0)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
