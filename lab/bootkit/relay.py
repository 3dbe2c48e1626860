"""One guest TCP connection to the lab's NFS server: QEMU's guestfwd runs this per connection.

QEMU (libslirp) hands the guest's side of the connection over as stdin, stdout AND stderr, so nothing
may be printed here: any diagnostic would be injected into the guest's NFS stream. We connect to
HOST PORT and copy bytes both ways until either side closes. Standard library only.
"""

import os
import selectors
import socket
import sys


def main(host: str, port: int) -> int:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # stderr is the guest's socket too
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError:
        return 1  # the guest sees its connection closed; its mount fails and /init says so
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "guest")
    sel.register(sock, selectors.EVENT_READ, "server")
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "guest":
                    data = os.read(0, 1 << 16)
                    if not data:
                        return 0
                    sock.sendall(data)
                else:
                    data = sock.recv(1 << 16)
                    if not data:
                        return 0
                    view = memoryview(data)
                    while view:
                        view = view[os.write(1, view):]
    except OSError:
        return 0
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
