#!/usr/bin/env python3
"""Measures `trellis serve` start-up: from process start to the first accepted
run, with 20 plugins, the compiled-code cache cold and then warm.

    python3 tests/bench/restart.py [path/to/trellis] [rounds]

The 20 plugins are the fixture `noop` at 20 versions: the version string its
info() answers is patched in place (`1.0.0` -> `1.1.0`, ..., `2.9.0`), so each
is a distinct component with its own digest, compiled and probed on its own.
Runs on loopback only.
"""
import os, shutil, socket, subprocess, sys, tempfile, time, urllib.error, urllib.request

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
trellis = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "target", "release", "trellis")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
noop = open(os.path.join(root, "target", "plugins-test", "noop.wasm"), "rb").read()

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def start_to_first_run(work, data):
    port = free_port()
    began = time.perf_counter()
    server = subprocess.Popen(
        [trellis, "serve", "--bind", f"127.0.0.1:{port}", "--data-dir", data,
         "--plugin-dir", os.path.join(work, "plugins"), "--workflow-dir", os.path.join(work, "workflows")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/workflows/first/runs", data=b"{}",
                    headers={"content-type": "application/json"}, method="POST")
                with urllib.request.urlopen(req, timeout=5) as reply:
                    if reply.status == 202:
                        return time.perf_counter() - began
            except urllib.error.HTTPError as refused:
                raise SystemExit(f"the server refused the run: {refused.code} {refused.read()!r}")
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("the server exited")
                time.sleep(0.002)
    finally:
        server.kill()
        server.wait()

with tempfile.TemporaryDirectory() as work:
    os.makedirs(os.path.join(work, "plugins"))
    os.makedirs(os.path.join(work, "workflows"))
    assert noop.count(b"1.0.0") == 1, "the version string is not where this script expects it"
    for i in range(20):
        version = f"{1 + i // 10}.{i % 10}.0".encode()
        open(os.path.join(work, "plugins", f"noop-{version.decode()}.wasm"), "wb").write(noop.replace(b"1.0.0", version))
    open(os.path.join(work, "workflows", "first.toml"), "w").write(
        '[[step]]\nid = "a"\nplugin = "noop@1.0.0"\ninput = 1\n')
    results = {"cold": [], "warm": []}
    for _ in range(rounds):
        data = tempfile.mkdtemp(dir=work)
        results["cold"].append(start_to_first_run(work, data))   # empty cache
        results["warm"].append(start_to_first_run(work, data))   # the cache the cold start wrote
        shutil.rmtree(data)
    for kind, times in results.items():
        times.sort()
        print(f"{kind}: median {times[len(times)//2]*1000:.0f} ms  (min {times[0]*1000:.0f}, max {times[-1]*1000:.0f}, n={len(times)})")
