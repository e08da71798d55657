#!/usr/bin/env python3
"""A tiny local reverse proxy for scripts/conformance.sh.

It exists only because the gateway's /mcp requires `Authorization: Bearer
<task token>` on every request and the MCP conformance suite's `server`
command has no option to send a custom header. It adds that one header and
forwards everything else unchanged: method, path, body and every other
header (Host, Origin and duplicated headers included, so the suite's
DNS-rebinding and header-validation checks reach the gateway as sent). The
response (status, headers, body) is streamed back as it arrives.

The token is read from TOKEN_FILE on every request, so the script can start
a fresh task for each scenario without restarting the proxy.

Usage: conformance-proxy.py UPSTREAM_HOST:PORT TOKEN_FILE PORT_FILE
Stdlib only. Binds a free port on 127.0.0.1 and writes it to PORT_FILE.
"""

import http.client
import http.server
import os
import socket
import sys

# Hop-by-hop headers (RFC 9110 section 7.6.1): never forwarded as such.
HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream = ("127.0.0.1", 0)
    token_file = ""

    def log_message(self, fmt, *args):  # quiet: the suite reports
        pass

    def _body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", "0") or "0")
        return self.rfile.read(length) if length > 0 else b""

    def _forward(self):
        body = self._body()
        with open(self.token_file, encoding="utf-8") as f:
            token = f.read().strip()
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                low = name.lower()
                if low in HOP or low in ("authorization", "content-length"):
                    continue
                conn.putheader(name, value.strip())
            conn.putheader("Authorization", f"Bearer {token}")
            if body or self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for name, value in resp.getheaders():
                if name.lower() in HOP:
                    continue
                self.send_header(name, value)
            no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
            chunked = length is None and not no_body
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if no_body:
                return
            # Stream: pass each piece on as soon as it arrives (SSE).
            while True:
                piece = resp.read1(65536)
                if not piece:
                    break
                if chunked:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                else:
                    self.wfile.write(piece)
                self.wfile.flush()
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (ConnectionError, socket.timeout, http.client.HTTPException) as e:
            try:
                msg = f"conformance proxy: upstream error: {e}".encode()
                self.send_response(502)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
            except OSError:
                pass
        finally:
            conn.close()

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = _forward


def main():
    upstream, token_file, port_file = sys.argv[1], sys.argv[2], sys.argv[3]
    host, _, uport = upstream.rpartition(":")
    Proxy.upstream = (host, int(uport))
    Proxy.token_file = token_file
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    server.daemon_threads = True
    with open(port_file + ".tmp", "w", encoding="utf-8") as f:
        f.write(str(server.server_address[1]))
    os.replace(port_file + ".tmp", port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
