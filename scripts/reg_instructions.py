#!/usr/bin/env python3
"""Opens N device sessions against one herald gateway and waits for every `hello`.

Used with callgrind to count the gateway's instructions per registration (see
docs/benchmarks.md, "Instructions per registration"). Standard library only: the JWT is
HS256 over the shared secret, the handshake and the server's frames are read by hand.

    reg_instructions.py PORT SECRET N [CONCURRENCY] [OFFSET]
"""
import asyncio, base64, hashlib, hmac, json, os, sys, time

def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

def token(secret, device):
    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64(json.dumps({"sub": device, "aud": "herald-device", "exp": now + 3600,
                           "iat": now, "app": "default"}, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"

async def open_session(port, secret, device, held):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write((f"GET /v1/connect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
             f"Authorization: Bearer {token(secret, device)}\r\n\r\n").encode())
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"{device}: {head!r} {await r.read(500)!r}")
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await r.readexactly(2), "big")
    frame = json.loads(await r.readexactly(n))
    assert frame["type"] == "hello", frame
    held.append((r, w))

async def main():
    port, secret, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    conc = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    offset = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    held, sem = [], asyncio.Semaphore(conc)
    async def one(i):
        async with sem:
            await open_session(port, secret, f"reg-{offset + i}", held)
    await asyncio.gather(*(one(i) for i in range(count)))
    print(f"{len(held)} sessions open", flush=True)
    # Hold them until told (stdin closes), so the measurement window ends with them open.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
