"""The kernel's view of a local server's TCP connections (Linux /proc/net/tcp), for tests that wait on them."""

from __future__ import annotations

from pathlib import Path

# The `st` column of /proc/net/tcp (include/net/tcp_states.h).
TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}

PROC_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def tcp_states(local_port: int) -> list[str]:
    """The state of every TCP socket of this network namespace whose local port is `local_port`.

    For a server's port these are its listener and its side of each connection.
    """
    states = []
    for table in PROC_TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except FileNotFoundError:
            continue  # no IPv6 in this namespace
        for line in lines:
            fields = line.split()
            local_address, state = fields[1], fields[3]
            if int(local_address.rsplit(":", 1)[1], 16) == local_port:
                states.append(TCP_STATES.get(state, state))
    return states


def connections_closed_by_clients(server_port: int) -> int:
    """The server's connections whose client has closed its end and the server not yet its own (CLOSE_WAIT).

    A Go HTTP server (Ollama) closes such a connection only after the handler of its last request has
    returned, so none being left means every request whose client went away has finished.
    """
    return tcp_states(server_port).count("CLOSE_WAIT")
