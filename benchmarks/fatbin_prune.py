"""Shrinks an fbgemm-gpu CUDA install to one GPU architecture, so that it can travel to a GPU machine.

The fbgemm-gpu CUDA wheel is 465 MB (2.5 GB unpacked): its shared libraries carry the device code of
every kernel for sm_80, sm_90a and sm_100a. A machine with one kind of GPU loads one of them. This script
zeroes, in place, the device code (the payload of every fat-binary entry) of the other architectures, and
of every architecture in the libraries named by ``--drop`` (host code stays, so they still load; their
kernels must then not be launched). Zeroed bytes compress to nothing: pruned to sm_90 with the VBE, global
weight decay, dense and inference libraries dropped, fbgemm-gpu 1.6.0 packs into 51 MB of ``tar.xz``.

Usage (run it on an unpacked copy of the wheel)::

    python -m benchmarks.fatbin_prune --keep 90 --drop vbe gwd inference backward_dense \\
        --drop-optimizers adagrad lamb lars_sgd partial_rowwise_adam partial_rowwise_lamb \\
        rowwise_adagrad_with_counter -- fbgemm_gpu/*.so
    tar -cf - fbgemm_gpu | xz -9 -T2 > .whl/fb_min.tar.xz

``benchmarks/gpu_device_run.sh`` installs the result there and runs ``pipelines.benchmark --use-gpu``.
The format read here: an ELF section ``.nv_fatbin`` holds containers (magic ``0xBA55ED50``, u16 version,
u16 header size, u64 payload size), each a run of entries (u16 kind, u16, u32 header size, u64 payload
size, ..., u32 architecture at offset 28), the payload after the entry's header.
"""

from __future__ import annotations

import argparse
import mmap
import re
import struct
import sys
from collections import Counter
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50


def fatbin_section(buf: mmap.mmap) -> tuple[int, int] | None:
    """Offset and size of the ELF section ``.nv_fatbin`` (None: the file has none)."""
    if buf[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    (shoff,) = struct.unpack_from("<Q", buf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", buf, 0x3A)

    def header(i: int) -> tuple[int, ...]:
        return struct.unpack_from("<IIQQQQIIQQ", buf, shoff + i * shentsize)

    names = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        start = names + h[0]
        if buf[start : buf.find(b"\0", start)] == b".nv_fatbin":
            return h[4], h[5]
    return None


OPTIMIZER_KERNEL = re.compile(rb"backward_codegen_([a-z_]+?)_(?:unweighted|weighted|vbe|nobag)")


def optimizers_of(code: bytes) -> set[str]:
    """The optimizers whose TBE backward kernels an entry's device code holds (its ELF symbol names)."""
    return {m.group(1).decode() for m in OPTIMIZER_KERNEL.finditer(code)}


def prune(
    path: Path, keep: set[int], write: bool, drop_optimizers: frozenset[str] = frozenset()
) -> Counter[str]:
    """Bytes of device code per ``kind_smNN`` in ``path``; with ``write``, zeroes those not in ``keep``.

    An entry whose code holds only backward kernels of ``drop_optimizers`` is zeroed too (``dropped``).
    """
    with path.open("r+b" if write else "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if write else mmap.ACCESS_READ)
        stats: Counter[str] = Counter()
        section = fatbin_section(buf)
        if section is None:
            return stats
        pos, end = section[0], section[0] + section[1]
        while pos + 16 <= end:
            magic, _, header_size, payload = struct.unpack_from("<IHHQ", buf, pos)
            if magic != FATBIN_MAGIC:
                pos += 8  # containers are 8-byte aligned, with padding between them
                continue
            entry, stop = pos + header_size, pos + header_size + payload
            while entry < stop:
                kind, _, entry_header, size = struct.unpack_from("<HHIQ", buf, entry)
                (arch,) = struct.unpack_from("<I", buf, entry + 28)
                stats[f"{'ptx' if kind == 1 else 'elf'}_sm{arch}"] += size
                body = slice(entry + entry_header, entry + entry_header + size)
                optimizers = optimizers_of(buf[body]) if drop_optimizers and arch in keep else set()
                dropped = bool(optimizers) and optimizers <= drop_optimizers
                if dropped:
                    stats["dropped"] += size
                if write and (arch not in keep or dropped):
                    buf[body] = bytes(size)
                entry += entry_header + size
            pos = stop
        if write:
            buf.flush()
        return stats


def main(argv: list[str] | None = None) -> int:
    """Prunes the given libraries and prints what each held."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fatbin_prune", description=__doc__)
    parser.add_argument("--keep", type=int, nargs="+", default=[90], help="architectures to keep (90)")
    parser.add_argument("--drop", nargs="*", default=[], help="libraries (name parts) to empty entirely")
    parser.add_argument(
        "--drop-optimizers",
        nargs="*",
        default=[],
        help="TBE optimizers whose backward kernels to empty (e.g. lamb adagrad): training uses one",
    )
    parser.add_argument("--dry-run", action="store_true", help="only print what each library holds")
    parser.add_argument("libraries", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.libraries:
        if not path.is_file():
            parser.error(f"libraries: no such file {str(path)!r}")
        keep = set() if any(part in path.name for part in args.drop) else set(args.keep)
        stats = prune(path, keep, not args.dry_run, frozenset(args.drop_optimizers))
        held = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(stats.items())) or "no device code"
        print(f"{path.name}: {held}; kept {sorted(keep) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
