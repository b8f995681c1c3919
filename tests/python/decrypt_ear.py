#!/usr/bin/env python3
"""Independent decryptor for ear-sidecar backing files (format version 2).

Written only from doc/FORMAT.md, with Python's `cryptography` and `xxhash`
packages, to prove that the document is precise enough to decrypt a data
directory without the Rust code. It reads `keys.json` and the local KEK,
unwraps every universe key (AES-256-GCM with the documented AAD), derives the
per-file, per-epoch keys with HKDF-SHA256, verifies the header MAC of both
header slots, applies the read rule to every block's slot pair (XXH3-64
checks, generations, zero slots; AES-256-GMAC tags in integrity mode) and
decrypts the data blocks with AES-256-CTR.

Usage:
    decrypt_ear.py --data-dir D --export NAME [--kek-file F] [--output PATH]

The plaintext image of the export (exactly `size` bytes) goes to PATH, or to
stdout when no --output is given. Any inconsistency is an error (exit 1) with
a message on stderr: a decryptor that guesses would prove nothing. A summary
of what was seen (epochs, slots) goes to stderr as one JSON line.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import struct
import sys

try:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    import xxhash
except ImportError as e:  # pragma: no cover - reported by the Rust test
    sys.stderr.write("decrypt_ear.py: the Python 'cryptography' and 'xxhash' packages are "
                     "required: %s\n" % e)
    sys.exit(3)

# doc/FORMAT.md, "Backing file layout", "Header slot", "Group", "Entry".
MAGIC = b"EARSCAR\x01"
HEADER_SLOT = 4096
HEADER_BODY = 192
DATA_START = 8192
BLOCK_SIZE = 4096
GROUP_BLOCKS = 256
SLOT_SIZE = 64
PAIR_SIZE = 128
GROUP_META = GROUP_BLOCKS * PAIR_SIZE
GROUP_BYTES = GROUP_META + GROUP_BLOCKS * BLOCK_SIZE  # 1,081,344
WRAP_AAD_DOMAIN = b"ear-sidecar/v1 local-wrap context"
INFO_DATA = b"ear-sidecar/v2 data-key"
INFO_HEADER = b"ear-sidecar/v2 header-mac-key"
INFO_BLOCK_MAC = b"ear-sidecar/v2 block-mac-key"


class FormatError(Exception):
    """The data directory does not follow doc/FORMAT.md."""


# ---------------------------------------------------------------- keys


def context_aad(ctx):
    """AAD of a local-provider wrapped key: domain || u64be(n) || sorted (k, v) pairs."""
    items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in ctx.items())
    out = bytearray(WRAP_AAD_DOMAIN)
    out += struct.pack(">Q", len(items))
    for k, v in items:
        out += struct.pack(">Q", len(k)) + k + struct.pack(">Q", len(v)) + v
    return bytes(out)


def unwrap_universe_keys(registry, kek):
    """{version: universe key} for every version in the registry."""
    if registry.get("provider") != "local":
        raise FormatError("only the local provider can be decrypted offline, not %r"
                          % registry.get("provider"))
    keys = {}
    for entry in registry["versions"]:
        blob = base64.b64decode(entry["wrapped"], validate=True)
        if len(blob) != 60:
            raise FormatError("wrapped key of version %d has %d bytes, expected 60"
                              % (entry["version"], len(blob)))
        ctx = entry["context"]
        if ctx.get("ear-sidecar:dir-id") != registry["dir_id"]:
            raise FormatError("context dir-id does not match the registry dir_id")
        if ctx.get("ear-sidecar:key-version") != str(entry["version"]):
            raise FormatError("context key-version does not match the version")
        nonce, sealed = blob[:12], blob[12:]
        try:
            key = AESGCM(kek).decrypt(nonce, sealed, context_aad(ctx))
        except Exception as e:  # InvalidTag
            raise FormatError("cannot unwrap universe key version %d: wrong KEK or AAD (%s)"
                              % (entry["version"], type(e).__name__))
        if len(key) != 32:
            raise FormatError("universe key is not 32 bytes")
        keys[entry["version"]] = key
    return keys


REGISTRY_MAC_DOMAIN = b"ear-sidecar/v2 key-registry"
INFO_REGISTRY_MAC = b"ear-sidecar/v2 registry-mac-key"


def registry_canonical(registry):
    """The bytes the registry `mac` covers (FORMAT.md, Registry integrity)."""
    def s(text):
        b = text.encode("utf-8")
        return struct.pack(">Q", len(b)) + b

    def opt(text):
        return b"\x00" if text is None else b"\x01" + s(text)

    out = bytearray(REGISTRY_MAC_DOMAIN)
    out += struct.pack(">I", registry["format"]) + s(registry["dir_id"])
    out += bytes([1 if registry["encryption"] == "on" else 0])
    out += opt(registry["provider"]) + opt(registry["master_key_id"])
    out += struct.pack(">I", registry["active_version"] or 0)
    versions = sorted(registry["versions"], key=lambda v: v["version"])
    out += struct.pack(">Q", len(versions))
    for v in versions:
        blob = base64.b64decode(v["wrapped"], validate=True)
        out += struct.pack(">I", v["version"]) + struct.pack(">Q", len(blob)) + blob
        out += struct.pack(">Q", v["created_unix"])
        items = sorted(v["context"].items(), key=lambda kv: kv[0].encode("utf-8"))
        out += struct.pack(">Q", len(items))
        for k, val in items:
            out += s(k) + s(val)
    return bytes(out)


def verify_registry_mac(registry, universe_keys):
    """Checks every version's `mac` under its own key; only a one-version registry may lack them."""
    versions = registry["versions"]
    if not any("mac" in v for v in versions):
        if [v["version"] for v in versions] == [1] and registry["active_version"] == 1:
            return
        raise FormatError("keys.json has no mac but more than version 1")
    msg = registry_canonical(registry)
    for v in versions:
        if "mac" not in v:
            raise FormatError("key version %d has no mac" % v["version"])
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes.fromhex(registry["dir_id"]),
                   info=INFO_REGISTRY_MAC).derive(universe_keys[v["version"]])
        want = hmac.new(key, msg, hashlib.sha256).digest()
        if not hmac.compare_digest(want, bytes.fromhex(v["mac"])):
            raise FormatError("keys.json mac of version %d does not verify (the registry was edited)"
                              % v["version"])


def derive(universe_key, file_id, info):
    """HKDF-SHA256(salt = file_id, IKM = universe key, info), 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=file_id, info=info).derive(universe_key)


# ---------------------------------------------------------------- header


def parse_header(slot, dir_id, universe_keys, encrypted):
    """Decodes and authenticates one 4096-byte header slot; raises FormatError."""
    if len(slot) != HEADER_SLOT:
        raise FormatError("short header slot")
    body, mac = slot[:HEADER_BODY], slot[HEADER_BODY:HEADER_BODY + 32]
    if body[0:8] != MAGIC:
        raise FormatError("bad magic")
    (version, body_len, algorithm, integrity, block_size, group_blocks, pair_size, flags,
     key_version) = struct.unpack_from("<HHHHIIHHI", body, 8)
    if version != 2:
        raise FormatError("unknown format version %d" % version)
    if body_len != HEADER_BODY:
        raise FormatError("MAC-covered body length %d" % body_len)
    if (block_size, group_blocks, pair_size, flags) != (BLOCK_SIZE, GROUP_BLOCKS, PAIR_SIZE, 0):
        raise FormatError("unexpected geometry/flags")
    if integrity not in (0, 1) or (integrity == 1 and not encrypted):
        raise FormatError("integrity %d" % integrity)
    if any(slot[HEADER_BODY + 32:]):
        raise FormatError("bytes 224..4096 of the header are not zero")
    file_id = body[32:48]
    size, sequence = struct.unpack_from("<QQ", body, 48)
    hdr_dir_id = body[64:80]
    (name_len,) = struct.unpack_from("<H", body, 80)
    if not 1 <= name_len <= 64:
        raise FormatError("name length %d" % name_len)
    name = body[82:82 + name_len].decode("ascii")
    if any(body[82 + name_len:146]):
        raise FormatError("bytes after the name are not zero")
    check_alg, state = struct.unpack_from("<HH", body, 146)
    (epoch,) = struct.unpack_from("<I", body, 152)
    (epoch_writes,) = struct.unpack_from("<Q", body, 160)
    if check_alg != 1 or state not in (0, 1) or not 1 <= epoch_writes <= 1 << 32:
        raise FormatError("check algorithm / state / epoch size")
    if any(body[150:152]) or any(body[156:160]) or any(body[168:192]):
        raise FormatError("reserved header bytes set")
    if encrypted:
        if algorithm != 1:
            raise FormatError("algorithm %d in an encrypted directory" % algorithm)
        if key_version not in universe_keys:
            raise FormatError("header key version %d is not in the registry" % key_version)
        header_key = derive(universe_keys[key_version], file_id, INFO_HEADER)
        expect = hmac.new(header_key, body, hashlib.sha256).digest()
    else:
        if algorithm != 0 or key_version != 0:
            raise FormatError("encrypted header in a plaintext directory")
        expect = hashlib.sha256(body).digest()
    if not hmac.compare_digest(expect, mac):
        raise FormatError("header MAC does not verify (wrong key or tampered header)")
    if hdr_dir_id != dir_id:
        raise FormatError("header belongs to another data directory")
    return {"file_id": file_id, "size": size, "sequence": sequence, "name": name,
            "algorithm": algorithm, "key_version": key_version, "integrity": integrity,
            "state": state, "epoch": epoch, "epoch_writes": epoch_writes}


# ---------------------------------------------------------------- slots


def parse_slot(raw):
    """None for an empty slot, a dict for a decodable one, "bad" otherwise."""
    if not any(raw):
        return None
    nonce = raw[0:12]
    key_version, epoch, generation, kind = struct.unpack_from("<IIIH", raw, 12)
    if kind not in (1, 2) or any(raw[26:32]) or any(raw[56:64]):
        return "bad"
    (check,) = struct.unpack_from("<Q", raw, 32)
    return {"head": raw[0:32], "nonce": nonce, "key_version": key_version, "epoch": epoch,
            "generation": generation, "kind": kind, "check": check, "tag": raw[40:56]}


def newer(a, b):
    """Serial-number comparison of 32-bit generations."""
    d = (a - b) & 0xFFFFFFFF
    return d != 0 and d < 0x80000000


def slot_valid(s, block, stored, tag_ok):
    h = xxhash.xxh3_64()
    h.update(s["head"])
    h.update(struct.pack("<Q", block))
    if s["kind"] == 1:
        h.update(stored)
    if h.intdigest() != s["check"]:
        return False
    return s["kind"] == 2 or tag_ok(s)


# ---------------------------------------------------------------- data


def decrypt_export(data_dir, export, kek_file, out):
    with open(os.path.join(data_dir, "keys.json"), "rb") as f:
        registry = json.load(f)
    if registry.get("format") != 1:
        raise FormatError("keys.json format %r" % registry.get("format"))
    dir_id = bytes.fromhex(registry["dir_id"])
    if len(dir_id) != 16:
        raise FormatError("dir_id is not 16 bytes")
    encrypted = registry["encryption"] == "on"
    universe_keys = {}
    if encrypted:
        with open(kek_file, "rb") as f:
            kek = f.read()
        if len(kek) != 32:
            raise FormatError("KEK file holds %d bytes, not 32" % len(kek))
        universe_keys = unwrap_universe_keys(registry, kek)
        verify_registry_mac(registry, universe_keys)
    elif registry["encryption"] != "off":
        raise FormatError("encryption is %r" % registry["encryption"])

    path = os.path.join(data_dir, "exports", export + ".ear")
    with open(path, "rb") as f:
        headers, errors = [], []
        for i in range(2):
            f.seek(i * HEADER_SLOT)
            try:
                headers.append(parse_header(f.read(HEADER_SLOT), dir_id, universe_keys,
                                            encrypted))
            except FormatError as e:
                errors.append("slot %s: %s" % ("AB"[i], e))
        if not headers:
            raise FormatError("no valid header: " + "; ".join(errors))
        h = max(headers, key=lambda x: x["sequence"])
        if h["name"] != export:
            raise FormatError("header names export %r, not %r" % (h["name"], export))
        size = h["size"]
        blocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        expected_len = DATA_START + ((blocks + GROUP_BLOCKS - 1) // GROUP_BLOCKS) * GROUP_BYTES
        actual_len = os.fstat(f.fileno()).st_size
        if actual_len != expected_len:
            raise FormatError("file length %d, FORMAT.md says %d" % (actual_len, expected_len))

        keys = {}

        def block_keys(version, epoch):
            """(data key, block-MAC key) of (version, epoch)."""
            if version not in universe_keys:
                raise FormatError("unknown key version %d" % version)
            if (version, epoch) not in keys:
                e = struct.pack(">I", epoch)
                u = universe_keys[version]
                keys[(version, epoch)] = (derive(u, h["file_id"], INFO_DATA + e),
                                          derive(u, h["file_id"], INFO_BLOCK_MAC + e))
            return keys[(version, epoch)]

        seen = {"epochs": set(), "newest_in_slot": [0, 0], "zero_slots": 0,
                "older_slot_used": 0, "torn_first": 0, "tags_verified": 0,
                "key_versions": set(), "header_key_version": h["key_version"]}
        remaining = size
        zero = bytes(BLOCK_SIZE)
        for g in range((blocks + GROUP_BLOCKS - 1) // GROUP_BLOCKS):
            group_at = DATA_START + g * GROUP_BYTES
            f.seek(group_at)
            table = f.read(GROUP_META)
            for i in range(GROUP_BLOCKS):
                b = g * GROUP_BLOCKS + i
                if b >= blocks:
                    break
                pair = table[i * PAIR_SIZE:(i + 1) * PAIR_SIZE]
                slots = [parse_slot(pair[0:SLOT_SIZE]), parse_slot(pair[SLOT_SIZE:PAIR_SIZE])]
                used = [(j, s) for j, s in enumerate(slots) if isinstance(s, dict)]
                if not any(pair):
                    plain = zero
                else:
                    f.seek(group_at + GROUP_META + i * BLOCK_SIZE)
                    stored = f.read(BLOCK_SIZE)
                    if len(used) == 2 and newer(used[1][1]["generation"],
                                                used[0][1]["generation"]):
                        used.reverse()

                    def tag_ok(s, stored=stored, b=b):
                        if h["integrity"] != 1:
                            return not any(s["tag"])
                        _, mac_key = block_keys(s["key_version"], s["epoch"])
                        aad = (h["file_id"] + struct.pack(">QII", b, s["key_version"], s["epoch"])
                               + stored)
                        seen["tags_verified"] += 1
                        return AESGCM(mac_key).encrypt(s["nonce"], b"", aad) == s["tag"]

                    chosen = None
                    for rank, (j, s) in enumerate(used):
                        if slot_valid(s, b, stored, tag_ok):
                            chosen = (rank, j, s)
                            break
                    if chosen is None:
                        if None in slots:
                            # A first write that did not land: zeros.
                            seen["torn_first"] += 1
                            plain = zero
                        else:
                            raise FormatError("block %d matches neither slot" % b)
                    else:
                        rank, j, s = chosen
                        seen["older_slot_used"] += rank
                        seen["newest_in_slot"][j] += 1 - rank
                        if s["kind"] == 2:
                            seen["zero_slots"] += 1
                            plain = zero
                        elif encrypted:
                            seen["epochs"].add(s["epoch"])
                            seen["key_versions"].add(s["key_version"])
                            data_key, _ = block_keys(s["key_version"], s["epoch"])
                            dec = Cipher(algorithms.AES(data_key),
                                         modes.CTR(s["nonce"] + b"\x00\x00\x00\x00")).decryptor()
                            plain = dec.update(stored) + dec.finalize()
                        else:
                            if any(s["nonce"]) or s["key_version"] or s["epoch"]:
                                raise FormatError("block %d: nonce/key in plaintext" % b)
                            plain = stored
                n = min(BLOCK_SIZE, remaining)
                out.write(plain[:n])
                remaining -= n
        seen["epochs"] = sorted(seen["epochs"])
        seen["key_versions"] = sorted(seen["key_versions"])
        h["seen"] = seen
        if remaining != 0:
            raise FormatError("internal: %d bytes not produced" % remaining)
    return h


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--kek-file",
                    help="default: $XDG_CONFIG_HOME/ear-sidecar/local.kek or ~/.config/ear-sidecar/local.kek")
    ap.add_argument("--output", help="default: stdout")
    a = ap.parse_args()
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    kek_file = a.kek_file or os.path.join(config_home, "ear-sidecar", "local.kek")
    try:
        if a.output:
            with open(a.output, "wb") as out:
                h = decrypt_export(a.data_dir, a.export, kek_file, out)
        else:
            h = decrypt_export(a.data_dir, a.export, kek_file, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    except (FormatError, OSError, KeyError, ValueError) as e:
        sys.stderr.write("decrypt_ear.py: error: %s\n" % e)
        return 1
    sys.stderr.write("decrypt_ear.py: export %s: %d bytes, sequence %d\n"
                     % (h["name"], h["size"], h["sequence"]))
    sys.stderr.write("SEEN " + json.dumps(h["seen"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
