"""Make the packets of one loopback port vanish (nftables), for silent-drop tests.

A :class:`~.fault_proxy.FaultProxy` can stall, reset and close, but its kernel still acknowledges
every packet, so TCP keepalive and TCP_USER_TIMEOUT never fire through it. A real silent drop
(a NAT entry or firewall state that expired, a pulled cable) needs packets to disappear:

    with FaultProxy(("127.0.0.1", imap_port)) as proxy, PacketDrop(proxy.port):
        ...   # nothing passes between 127.0.0.1 and the proxy's port, in either direction

The rules live in a table of their own (``inet o365mail_drop_<port>``), match only
127.0.0.1 -> 127.0.0.1 TCP with the given port as source or destination, and the table is deleted
when the block ends, whatever happened in it. Needs root (CAP_NET_ADMIN) and the ``nft`` command
(Debian's nftables package, installed with the sandbox's packages).
"""

from __future__ import annotations

import shutil
import subprocess
from types import TracebackType


class PacketDropUnavailable(RuntimeError):
    """nftables cannot be used here (no ``nft``, no privilege, no kernel support); the text says which."""


def _nft(*args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", *args], input=script, capture_output=True, text=True, check=False, timeout=30)


class PacketDrop:
    """While active, TCP packets from or to ``127.0.0.1:<port>`` on the loopback are dropped silently."""

    def __init__(self, port: int) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"not a TCP port: {port}")
        self.port = port
        self.table = f"o365mail_drop_{port}"
        self.active = False

    @staticmethod
    def unavailable() -> str | None:
        """Why packet drops cannot be used here, or None when they can (tries a table of its own)."""
        if shutil.which("nft") is None:
            return "the nft command is missing (Debian package nftables)"
        probe = "o365mail_drop_probe"
        result = _nft("-f", "-", script=f"add table inet {probe}\ndelete table inet {probe}\n")
        if result.returncode != 0:
            return f"nft cannot create a table here ({result.stderr.strip() or result.returncode})"
        return None

    def start(self) -> PacketDrop:
        # The input hook: the sender's kernel thinks the packet left; the receiver never sees it.
        match = "ip saddr 127.0.0.1 ip daddr 127.0.0.1"
        script = (
            f"add table inet {self.table}\n"
            f"add chain inet {self.table} input {{ type filter hook input priority -10 ; policy accept ; }}\n"
            f"add rule inet {self.table} input {match} tcp dport {self.port} drop\n"
            f"add rule inet {self.table} input {match} tcp sport {self.port} drop\n"
        )
        result = _nft("-f", "-", script=script)
        if result.returncode != 0:
            self.stop()  # a half-made table must not stay
            raise PacketDropUnavailable(f"nft refused the drop rules for port {self.port}: {result.stderr.strip()}")
        self.active = True
        return self

    def stop(self) -> None:
        """Delete the table (and its rules); safe to call twice or after a failed start."""
        _nft("delete", "table", "inet", self.table)
        self.active = False

    def __enter__(self) -> PacketDrop:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
