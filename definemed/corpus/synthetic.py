"""Synthetic FineWeb2-schema corpora built from the bundled sample, with planted ground truth.

Used by the scale benchmark (`benchmarks/bench_corpus_scale.py`) and by tests that need a known answer:
- documents recombined from the sample's sentences (medical documents from medical sentences, about 2% of
  documents), with log-normal word counts around FineWeb2-de's mean (~550 words: 234.8B words / 427.7M docs);
- exact duplicates (the same text, other whitespace, another id);
- near-duplicates whose word 5-gram Jaccard similarity to their source is measured exactly and recorded;
- planted German PII (names after cues, addresses, dates of birth, phone, e-mail, KVNR, IBAN, tax ID) with
  valid check digits, and the count of each kind.
Nothing here is drawn from real people: names and streets come from short lists, numbers are random.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterator

import numpy as np

from definemed.text import words

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-ZÄÖÜ„\"])|\n+")
FINEWEB2_COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score",
                    "language_script", "minhash_cluster_size")

FIRST = ["Anna", "Lukas", "Mehmet", "Sophie", "Jonas", "Leonie", "Ibrahim", "Marie", "Paul", "Katharina", "Selin",
         "Hans-Peter", "Ewa", "Dimitri", "Greta", "Yusuf"]
LAST = ["Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Hoffmann", "Schulz",
        "Yılmaz", "Kowalski", "Nguyen", "Schäfer", "Koch", "Richter", "Klein-Hartmann", "von Arnim"]
STREETS = ["Hauptstraße", "Lindenweg", "Bahnhofstr.", "Goethestraße", "Am Mühlenweg", "Schillerplatz", "Gartenallee",
           "Kirchgasse", "Rosenring", "Uferstraße"]
CITIES = [("10115", "Berlin"), ("80331", "München"), ("50667", "Köln"), ("01067", "Dresden"), ("20095", "Hamburg"),
          ("04109", "Leipzig"), ("60311", "Frankfurt am Main"), ("79098", "Freiburg")]


@lru_cache(maxsize=1)
def sentence_pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(medical, non-medical) sentences of the bundled sample, in a fixed order."""
    from definemed.data.loaders import read_web_pandas, sample_web_config

    df = read_web_pandas(sample_web_config())
    pools: dict[str, list[str]] = {"medical": [], "non_medical": []}
    for text, label in zip(df["text"], df["gold_label"]):
        pools[label] += [s.strip() for s in _SENT.split(text) if len(words(s)) >= 3]
    return tuple(pools["medical"]), tuple(pools["non_medical"])


def recombine(pool: tuple[str, ...], target_words: int, rng: np.random.Generator) -> str:
    """Sentences drawn from the pool until the target word count is reached, in paragraphs of 2-6."""
    out, n = [], 0
    while n < target_words:
        s = pool[int(rng.integers(len(pool)))]
        out.append(s)
        n += len(s.split())
    paras, i = [], 0
    while i < len(out):
        k = int(rng.integers(2, 7))
        paras.append(" ".join(out[i:i + k]))
        i += k
    return "\n\n".join(paras)


def shingle_set(text: str, n: int = 5) -> set[str]:
    w = [x.lower() for x in words(text)]
    return {" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))} if w else set()


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingle_set(a, n), shingle_set(b, n)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def near_duplicate(text: str, target: float, rng: np.random.Generator, vocab: tuple[str, ...],
                   n: int = 5) -> tuple[str, float]:
    """A variant of `text` with word 5-gram Jaccard close to `target` (returned exactly): isolated word
    substitutions each replace about n shingles, so k = S(1-J)/(n(1+J)) edits give Jaccard ~J."""
    toks = text.split(" ")
    s = max(1, len(toks) - n + 1)
    k = max(1, int(round(s * (1 - target) / (n * (1 + target)))))
    pos = rng.choice(len(toks), size=min(k, len(toks)), replace=False)
    for p in pos:
        toks[p] = vocab[int(rng.integers(len(vocab)))]
    variant = " ".join(toks)
    return variant, jaccard(text, variant, n)


def _kvnr(rng: np.random.Generator) -> str:
    from stdnum import luhn

    letter = chr(65 + int(rng.integers(26)))
    digits = "".join(str(int(d)) for d in rng.integers(0, 10, 8))
    payload = f"{ord(letter) - 64:02d}{digits}"
    return f"{letter}{digits}{luhn.checksum(payload + '0')}"


def _iban(rng: np.random.Generator) -> str:
    from stdnum import iban

    bban = "".join(str(int(d)) for d in rng.integers(0, 10, 18))
    raw = f"DE00{bban}"
    full = f"DE{iban.calc_check_digits(raw)}{bban}"
    return " ".join(full[i:i + 4] for i in range(0, len(full), 4))


def _tax_id(rng: np.random.Generator) -> str:
    from stdnum.de import idnr

    while True:  # the IdNr also constrains digit repetition; draw until stdnum accepts one
        body = "".join(str(int(d)) for d in rng.integers(0, 10, 10))
        if body[0] == "0":
            continue
        from stdnum.iso7064 import mod_11_10

        cand = body + mod_11_10.calc_check_digit(body)
        if idnr.is_valid(cand):
            return f"{cand[:2]} {cand[2:5]} {cand[5:8]} {cand[8:]}"


def pii_snippet(rng: np.random.Generator) -> tuple[str, dict[str, int]]:
    """One German clinical/administrative passage with known PII counts."""
    first, last = FIRST[int(rng.integers(len(FIRST)))], LAST[int(rng.integers(len(LAST)))]
    other = LAST[int(rng.integers(len(LAST)))]
    street = f"{STREETS[int(rng.integers(len(STREETS)))]} {int(rng.integers(1, 200))}"
    plz, city = CITIES[int(rng.integers(len(CITIES)))]
    d, m, y = int(rng.integers(1, 29)), int(rng.integers(1, 13)), int(rng.integers(1930, 2010))
    cue = ["Herr", "Frau", "Patientin", "Patient", "Pat."][int(rng.integers(5))]
    title = ["", "Dr. ", "Prof. Dr. "][int(rng.integers(3))]
    phone = f"0{int(rng.integers(30, 999))} {int(rng.integers(1000000, 9999999))}"
    mail = f"{first.lower().replace('-', '')}.{last.lower().replace(' ', '')}@praxis-beispiel.de".replace("ı", "i")
    templates = [
        (f"{cue} {title}{first} {last}, geb. {d:02d}.{m:02d}.{y}, wohnhaft {street}, {plz} {city}, "
         f"wurde am Vormittag aufgenommen.", {"name": 1, "date_of_birth": 1, "address": 2}),
        (f"Versichertennummer (KVNR): {_kvnr(rng)}. Rückfragen bitte unter {phone} oder per E-Mail an {mail}.",
         {"kvnr": 1, "phone": 1, "email": 1}),
        (f"Die Erstattung erfolgt auf das Konto IBAN {_iban(rng)}; Steuer-ID {_tax_id(rng)}.",
         {"iban": 1, "tax_id": 1}),
        (f"Bericht an Frau Dr. {other}. Die Patientin ist geboren am {d}. März {y}.",
         {"name": 1, "date_of_birth": 1}),
    ]
    text, counts = templates[int(rng.integers(len(templates)))]
    return text, counts


def planted_pii_set(n: int, seed: int = 0) -> list[tuple[str, dict[str, int]]]:
    rng = np.random.default_rng(seed)
    return [pii_snippet(rng) for _ in range(n)]


def synth_shard(start: int, n: int, seed: int, medical_fraction: float = 0.02, exact_dup_rate: float = 0.01,
                near_dup_rate: float = 0.01, pii_rate: float = 0.01,
                jaccards: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95)) -> tuple[dict[str, list], list[dict]]:
    """Documents start..start+n-1 as FineWeb2 columns, plus the planted truth rows.

    Duplicates copy a document of the same shard (so shards stay independent); their ids sort after the
    source's, so keep-the-smallest-id keeps the source."""
    rng = np.random.default_rng([seed, start])
    med, other = sentence_pools()
    # sorted: a set's order changes with PYTHONHASHSEED, and the planted variants must not
    vocab = tuple(sorted({w for s in other[:400] for w in s.split(" ") if w.isalpha()}))
    cols: dict[str, list] = {c: [] for c in FINEWEB2_COLUMNS}
    truth: list[dict] = []
    n_words = np.clip(rng.lognormal(np.log(330), 1.0, n), 30, 20_000).astype(int)
    for j in range(n):
        i = start + j
        doc_id = f"<urn:uuid:synth-{i:09d}>"
        r = rng.random()
        medical = rng.random() < medical_fraction
        if j > 0 and r < exact_dup_rate:
            src = int(rng.integers(j))
            text = cols["text"][src].replace(". ", ".  ", 2) + "\n"
            truth.append({"id": doc_id, "kind": "exact_dup", "of": cols["id"][src], "jaccard": 1.0})
        elif j > 0 and r < exact_dup_rate + near_dup_rate:
            src = int(rng.integers(j))
            text, jac = near_duplicate(cols["text"][src], float(rng.choice(jaccards)), rng, vocab)
            truth.append({"id": doc_id, "kind": "near_dup", "of": cols["id"][src], "jaccard": jac})
        else:
            text = recombine(med if medical else other, int(n_words[j]), rng)
        if rng.random() < pii_rate:
            snippet, counts = pii_snippet(rng)
            text = text + "\n\n" + snippet
            truth.append({"id": doc_id, "kind": "pii", "of": None, "jaccard": None, **{f"pii_{k}": v for k, v in
                                                                                      counts.items()}})
        dump = f"CC-MAIN-2024-{10 + i % 40:02d}"
        cols["text"].append(text)
        cols["id"].append(doc_id)
        cols["dump"].append(dump)
        cols["url"].append(f"https://www.beispiel-{i % 9973}.example.de/seite/{i}")
        cols["date"].append(f"2024-0{1 + i % 9}-1{i % 10}T12:00:00Z")
        cols["file_path"].append(f"s3://commoncrawl/crawl-data/{dump}/segments/{i % 1000}/warc/synth.warc.gz")
        cols["language"].append("deu")
        cols["language_score"].append(float(0.9 + 0.1 * rng.random()))
        cols["language_script"].append("Latn")
        cols["minhash_cluster_size"].append(1)
    return cols, truth


def iter_shards(n_docs: int, shard_size: int, seed: int, **kw) -> Iterator[tuple[int, dict[str, list], list[dict]]]:
    for s, start in enumerate(range(0, n_docs, shard_size)):
        cols, truth = synth_shard(start, min(shard_size, n_docs - start), seed, **kw)
        yield s, cols, truth
