"""PII redaction for kept text: e-mail addresses, phone numbers, IP addresses (with counts per kind).

Patterns target German/European formats (+49 30 1234567, 0171-1234567, (030) 123 456 78, 089/12 34 56) and
avoid dates, postcodes, dosages and ICD codes, which look numeric too. Order matters: e-mails first (they may
contain digits), then IPs (so 192.168.0.1 is not read as a phone number), then phones.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")
_OCT = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_RE = re.compile(rf"(?<![\w.]){_OCT}(?:\.{_OCT}){{3}}(?!\w|\.\w)")  # not "Klade 2.3.4.4b"
_H = r"[0-9A-Fa-f]{1,4}"
IPV6_RE = re.compile(rf"(?<![\w:])(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,6}}:(?:{_H}(?::{_H}){{0,5}})?|::(?:{_H}:){{0,6}}{_H})(?![\w:])")
_SEP = r"[ \t\-/.]?"
PHONE_RE = re.compile(
    r"(?<![\w+/.-])(?:"
    rf"(?:\+|00)[1-9]\d{{0,2}}{_SEP}(?:\(0\){_SEP})?\(?\d{{1,5}}\)?{_SEP}\d(?:{_SEP}\d){{3,10}}"  # international
    rf"|\(0\d{{2,5}}\){_SEP}\d(?:{_SEP}\d){{3,9}}"  # (030) 1234567
    rf"|0[1-9]\d{{1,4}}(?:[ \t]?[-/][ \t]?|[ \t])\d(?:{_SEP}\d){{3,9}}"  # 030 1234567, 0171-1234567
    r")(?![\w-]|\.\d)")

TAGS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>"}


def redact(text: str) -> tuple[str, dict[str, int]]:
    counts = {}
    text, counts["email"] = EMAIL_RE.subn(TAGS["email"], text)
    text, n4 = IPV4_RE.subn(TAGS["ip"], text)
    text, n6 = IPV6_RE.subn(TAGS["ip"], text)
    counts["ip"] = n4 + n6
    text, counts["phone"] = PHONE_RE.subn(TAGS["phone"], text)
    return text, counts


def redact_batch(df: "pd.DataFrame") -> "pd.DataFrame":
    df = df.copy()
    out, e, i, p = [], [], [], []
    for t in df["text"]:
        r, c = redact(t)
        out.append(r), e.append(c["email"]), i.append(c["ip"]), p.append(c["phone"])
    df["text"], df["pii_email"], df["pii_ip"], df["pii_phone"] = out, e, i, p
    return df
