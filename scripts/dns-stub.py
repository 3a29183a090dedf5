#!/usr/bin/env python3
"""A minimal DNS server for scripts/check-containers: answers A queries for the names it is
given, NODATA for other types of those names, NXDOMAIN for everything else, and logs every
question. It stands in for a cluster's DNS inside a network namespace, so the check proves that
the client in a scratch image resolves a short Service name through resolv.conf's search
domains (ndots:5), as kubelet sets them up.

    dns-stub.py --listen 127.0.0.1:53 --lifetime 120 websocket-test-server.ns.svc.cluster.local=127.0.0.1
"""
import argparse
import ipaddress
import socket
import struct
import sys
import time


def parse_question(packet):
    """Returns (id, flags, qname, qtype, qclass, end offset of the question)."""
    ident, flags, qdcount = struct.unpack_from("!HHH", packet)
    if qdcount != 1:
        raise ValueError("expected one question")
    labels, offset = [], 12
    while True:
        length = packet[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise ValueError("compressed question name")
        labels.append(packet[offset:offset + length].decode("ascii").lower())
        offset += length
    qtype, qclass = struct.unpack_from("!HH", packet, offset)
    return ident, flags, ".".join(labels), qtype, qclass, offset + 4


def answer(packet, records):
    ident, flags, name, qtype, qclass, end = parse_question(packet)
    question = packet[12:end]
    known = name in records
    rcode = 0 if known else 3  # NOERROR or NXDOMAIN
    answers = b""
    if known and qtype == 1 and qclass == 1:  # A, IN
        rdata = ipaddress.IPv4Address(records[name]).packed
        answers = struct.pack("!HHHIH", 0xC00C, 1, 1, 5, len(rdata)) + rdata
    # QR, AA, RD copied from the query, RA.
    out_flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | rcode
    header = struct.pack("!HHHHHH", ident, out_flags, 1, 1 if answers else 0, 0, 0)
    return header + question + answers, name, qtype, rcode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:53")
    parser.add_argument("--lifetime", type=float, default=120, help="exit after this many seconds")
    parser.add_argument("records", nargs="+", metavar="NAME=IPV4")
    args = parser.parse_args()
    records = {}
    for record in args.records:
        name, _, address = record.partition("=")
        records[name.lower().rstrip(".")] = address
    host, _, port = args.listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, int(port)))
    deadline = time.monotonic() + args.lifetime
    print(f"dns-stub: listening on {args.listen}", flush=True)
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            packet, peer = sock.recvfrom(512)
        except socket.timeout:
            break
        try:
            reply, name, qtype, rcode = answer(packet, records)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as error:
            print(f"dns-stub: bad query from {peer}: {error}", flush=True)
            continue
        sock.sendto(reply, peer)
        kind = {1: "A", 28: "AAAA"}.get(qtype, str(qtype))
        print(f"dns-stub: {kind} {name} -> {'NXDOMAIN' if rcode else records[name] if qtype == 1 else 'NODATA'}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
