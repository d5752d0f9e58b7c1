"""`stdrc serve` / `stdrc submit` refuse bad arguments with one `error:` line before starting anything."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from stdrc.cli import main

pytest.importorskip("ray.serve")


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_serve_refuses_a_missing_bundle_and_bad_numbers(capsys, tmp_path: Path, tiny_bundle: Path):
    assert "bundle" in _error(capsys, ["serve", "--bundle", str(tmp_path / "nope")]).lower()
    for flags, word in ((["--replicas", "0"], "--replicas"), (["--port", "0"], "--port"),
                        (["--max-queue", "-1"], "--max-queue"), (["--keep", "0"], "--keep"),
                        (["--cpus-per-replica", "0"], "--cpus-per-replica")):
        assert word in _error(capsys, ["serve", "--bundle", str(tiny_bundle), *flags])


def test_submit_says_when_no_server_answers(capsys, tmp_path: Path, astronaut_png: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    line = _error(capsys, ["submit", "--server", f"http://127.0.0.1:{port}", "--ref", str(astronaut_png),
                           "--prompt", "a", "-o", str(tmp_path / "out.mp4")])
    assert "cannot reach" in line and "stdrc serve" in line
    assert not (tmp_path / "out.mp4").exists()


def test_submit_sends_the_bucket_size_as_form_fields(capsys, tmp_path: Path, astronaut_png: Path):
    """--frames/--height/--width reach the job API as form fields; the server's refusal is the error line."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    bodies: list[bytes] = []

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps({"error": "no bucket 17x64x96 in this bundle: pass one of 9x96x64"}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        line = _error(capsys, ["submit", "--server", f"http://127.0.0.1:{server.server_address[1]}", "--ref",
                               str(astronaut_png), "--prompt", "a", "-o", str(tmp_path / "out.mp4"),
                               "--frames", "17", "--height", "96", "--width", "64"])
    finally:
        server.shutdown()
        server.server_close()
    assert "no bucket 17x64x96" in line
    assert len(bodies) == 1
    for name, value in (("frames", "17"), ("height", "96"), ("width", "64"), ("prompt", "a")):
        assert f'name="{name}"\r\n\r\n{value}\r\n'.encode() in bodies[0], bodies[0][:400]
    assert not (tmp_path / "out.mp4").exists()
