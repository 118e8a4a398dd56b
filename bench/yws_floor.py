#!/usr/bin/env python3
"""A y-websocket "server" that does nothing but answer: the floor of the cold-load benchmark.

Not a server. It keeps, per URL path, the first non-empty update it receives (the seeding
client's sync step 2) and sends it as the sync step 2 to every sync step 1, whatever the state
vector; on connect it sends an empty state vector (so the seeding client uploads everything) and
it ignores everything else (awareness, updates). With no document work at all, what
`coldload.mjs` measures against it is the client's own floor: its socket open, the transfer and
the decode (BENCHMARKS.md, session 21). Being Python, it answers a little slower than an ideal
server would, so the floor it shows is, if anything, high.

    python3 bench/yws_floor.py 9413 &
    (cd bench/node && node --expose-gc coldload.mjs --kind yjs \
        --server-url ws://127.0.0.1:9413/yjs --label floor)

Standard library only; one thread per connection; 127.0.0.1 only; frames over 64 MiB and
request heads over 16 KiB close the connection.
"""
import base64
import hashlib
import socket
import struct
import sys
import threading

MAX_FRAME = 64 << 20
MAX_HEAD = 16 << 10
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
rooms = {}  # path -> the step 2 frame to send, once known


def varuint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def read_varuint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return n, i


def frame(payload):
    """One unmasked binary frame."""
    n = len(payload)
    if n < 126:
        head = bytes([0x82, n])
    elif n < 65536:
        head = bytes([0x82, 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x82, 127]) + struct.pack(">Q", n)
    return head + payload


class Reader:
    """Buffered reads from a socket; `None` once it closes."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def fill(self, n):
        while len(self.buf) < n:
            more = self.sock.recv(1 << 20)
            if not more:
                return False
            self.buf += more
        return True

    def take(self, n):
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def handshake(sock, reader):
    while b"\r\n\r\n" not in reader.buf:
        if len(reader.buf) > MAX_HEAD or not reader.fill(len(reader.buf) + 1):
            return None
    head, reader.buf = reader.buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split()[1]
    key = next(l.split(":", 1)[1].strip() for l in lines if l.lower().startswith("sec-websocket-key"))
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    response = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
    ).encode()
    sock.sendall(response + frame(bytes([0, 0, 1, 0])))  # sync step 1, empty state vector
    return path


def next_message(reader):
    """The next client frame's opcode and unmasked payload, or `None`."""
    if not reader.fill(2):
        return None
    n, off = reader.buf[1] & 0x7F, 2
    if n == 126:
        if not reader.fill(4):
            return None
        n, off = struct.unpack(">H", reader.buf[2:4])[0], 4
    elif n == 127:
        if not reader.fill(10):
            return None
        n, off = struct.unpack(">Q", reader.buf[2:10])[0], 10
    if n > MAX_FRAME or not reader.fill(off + 4 + n):
        return None
    opcode = reader.buf[0] & 0x0F
    whole = reader.take(off + 4 + n)
    mask, data = whole[off:off + 4], whole[off + 4:]
    key = (mask * (n // 4 + 1))[:n]
    payload = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big") if n else b""
    return opcode, payload


def serve(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = Reader(sock)
    path = handshake(sock, reader)
    if path is None:
        return
    while True:
        message = next_message(reader)
        if message is None or message[0] == 8:
            return
        payload = message[1]
        if len(payload) < 2 or payload[0] != 0:  # not a sync message
            continue
        if payload[1] == 0:  # step 1: the stored update, or an empty one
            sock.sendall(rooms.get(path) or frame(bytes([0, 1, 2, 0, 0])))
        elif path not in rooms:  # step 2 or update: keep the first with content
            n, i = read_varuint(payload, 2)
            update = payload[i:i + n]
            if len(update) > 2:
                rooms[path] = frame(bytes([0, 1]) + varuint(len(update)) + update)


def main():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(sys.argv[1])))
    listener.listen(128)
    while True:
        sock, _ = listener.accept()

        def run(sock=sock):
            try:
                serve(sock)
            except (OSError, ValueError, IndexError, StopIteration):
                pass
            finally:
                sock.close()

        threading.Thread(target=run, daemon=True).start()


if __name__ == "__main__":
    main()
