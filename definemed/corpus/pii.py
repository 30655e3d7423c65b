"""PII redaction for kept German text, with a tag and a count per kind.

Kinds (tag): e-mail (<EMAIL>), phone (<PHONE>), IP address (<IP_ADDRESS>), IBAN (<IBAN>), health-insurance
number KVNR (<KVNR>), tax ID (<TAX_ID>), date of birth (<DATE_OF_BIRTH>), street address and PLZ + city
(<ADDRESS>), and personal names after a salutation, title or role word (<NAME>).

Rules, not a model: clinical German text is full of capitalised nouns, eponyms ("Morbus Crohn", "Parkinson"),
drug names and numbers that an NER model without German clinical training flags as persons, dates or IDs. So a
name is redacted only after a cue (Herr, Frau, Dr., Prof., Patient/Patientin, Pat., geb.), or as a full name (two
or three name words, none a medical term, drug or role noun) after a role or relation noun or a form label
(Hausärztin, Tochter, Sachbearbeiterin, Versicherte:, Name, Vorname:), or on the line of an address; a street
without a street word ("Sonnenhalde 7") only before a postcode and town or after an address cue (wohnhaft,
Anschrift:); a date only next to a birth cue (geb., geboren am, Geburtsdatum, *), and a number only when its check digit is valid (python-stdnum:
IBAN mod 97, tax ID; the KVNR check is the Luhn weighting of its 10-digit payload, computed with stdnum's luhn).
Dosages, lab values, ICD-10/OPS codes and guideline years have none of these cues and pass unchanged.

Order matters: e-mails first (they contain digits and names), then the check-digit numbers (before the phone
pattern can claim their digits), IPs, dates of birth (before "geb." is read as a maiden-name cue), phones,
addresses and finally names.
"""
from __future__ import annotations

import re
from typing import Callable

KINDS = ("email", "iban", "kvnr", "tax_id", "ip", "date_of_birth", "phone", "address", "name")
TAGS = {"email": "<EMAIL>", "iban": "<IBAN>", "kvnr": "<KVNR>", "tax_id": "<TAX_ID>", "ip": "<IP_ADDRESS>",
        "date_of_birth": "<DATE_OF_BIRTH>", "phone": "<PHONE>", "address": "<ADDRESS>", "name": "<NAME>"}

EMAIL_RE = re.compile(r"(?<![\w.+-])[^\W_][\w.%+-]*@[^\W_][\w-]*(?:\.[\w-]+)*\.[A-Za-z]{2,24}\b")  # umlauts too
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

# Check-digit numbers: candidates by shape, kept only when the check digit validates.
IBAN_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")
KVNR_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z]\d{9}(?![A-Za-z0-9])")
TAX_ID_RE = re.compile(r"(?<![\d.,/-])\d{2} ?\d{3} ?\d{3} ?\d{3}(?![\d.,/-]?\d)")

# Dates of birth: the date after a birth cue. The cue stays, the date goes.
_MONTHS = r"(?:Januar|Jänner|Februar|März|April|Mai|Juni|Juli|August|September|Oktober|November|Dezember|Jan|Feb|Mär|Apr|Jun|Jul|Aug|Sep|Sept|Okt|Nov|Dez)\.?"
_DATE = rf"(?:\d{{1,2}}\.\s?\d{{1,2}}\.\s?(?:\d{{4}}|\d{{2}})|\d{{1,2}}\.\s?{_MONTHS}\s\d{{4}}|\d{{4}}-\d{{2}}-\d{{2}}|\d{{1,2}}/\d{{1,2}}/\d{{4}})"
DOB_RE = re.compile(
    rf"((?:\bgeb\.(?:\s+am)?|\bgeboren(?:\s+am)?|\bGeburtsdatum|\bGeb\.-Datum|\bGeburtstag|(?<![\w*])\*)\s*:?\s*)({_DATE})(?!\d)",
    re.IGNORECASE)

# Addresses: "Musterstraße 12a", "Am Lindenweg 3", "Hauptstr. 5" and "10115 Berlin". A five-digit number followed by
# a plural/unit noun ("10000 Einheiten Heparin", "20000 Patienten") is a count, not a postcode.
# Only unambiguous street words: "-feld", "-berg", "-hof" are as often towns and sports clubs ("TuS Harsefeld 0:3").
_STREET_SUFFIX = r"(?:straße|strasse|str\.|weg|gasse|platz|allee|ring|damm|ufer|chaussee|steig|pfad|promenade)"
_CAP = r"[A-ZÄÖÜ][a-zäöüß]+"
STREET_RE = re.compile(
    rf"\b(?:(?:Am|An der|Auf dem|In der|Im|Zum|Zur|Alte|Neue|Große|Kleine)\s+)?"
    rf"(?:{_CAP}(?:-{_CAP})*[- ]?)?{_CAP}?{_STREET_SUFFIX}\s+\d{{1,4}}(?:\s?[a-zA-Z](?![a-zA-Z]))?(?:\s?[-/]\s?\d{{1,4}})?(?![,.:]\d|\d)")
_NOT_CITY = {"Einheiten", "Patienten", "Patientinnen", "Menschen", "Personen", "Fälle", "Fällen", "Euro", "Dollar",
             "Teilnehmer", "Teilnehmerinnen", "Proben", "Zellen", "Kinder", "Frauen", "Männer", "Todesfälle",
             "Neuerkrankungen", "Geburten", "Mal", "Jahre", "Jahren", "Schritte", "Kalorien", "Stück", "Tabletten",
             "Dosen", "Betten", "Ärzte", "Ärztinnen", "Mitglieder", "Todesopfer", "Infektionen", "Einwohner",
             "Studien", "Meter", "Kilometer", "Tonnen", "Liter", "Exemplare", "Euro.", "Fällen."}
# A street without a street word ("Sonnenhalde 7", "Am Rosenhag 5", "Lange Reihe 17") is told from "Station 4" or
# "Stadium 3" by what follows it in a letter: a postcode and a town, or an address cue before it.
_STREET_WORDS = (r"(?:(?:Am|An\s(?:der|den|dem)|Auf\s(?:der|dem|den)|Im|In\s(?:der|den)|Zum|Zur|Unter\s(?:den|der)|"
                 r"Hinter\s(?:der|dem|den)|Vor\s(?:der|dem|den))\s+"
                 r"|(?:Alte[rn]?|Neue[rn]?|Große[rn]?|Kleine[rn]?|Lange|Hohe|Breite|Obere[rn]?|Untere[rn]?|St\.|Sankt)\s)?"
                 rf"{_CAP}(?:-{_CAP})*")
_HOUSE = r"\d{1,4}(?:\s?[a-zA-Z](?![a-zA-Z]))?(?:\s?[-/]\s?\d{1,4})?"
_ADDRESS_CUE = r"(?:wohnhaft(?:[ \t]+in)?|[Aa]nschrift:|[Aa]dresse:|[Ww]ohnort:|[Ww]ohnung:|wohnt[ \t]+(?:in|im|am|an|auf))"
STREET_PLZ_RE = re.compile(
    rf"(?<![\w-]){_STREET_WORDS}[ \t]+{_HOUSE}(?=(?:,|[ \t]+in)?[ \t]*\n?[ \t]*(?:D-)?(?:0[1-9]\d{{3}}|[1-9]\d{{4}})"
    rf"[ \t]+(?P<city>{_CAP}))")
STREET_CUE_RE = re.compile(rf"({_ADDRESS_CUE}[ \t]+(?:der[ \t]+|dem[ \t]+)?)({_STREET_WORDS}[ \t]+{_HOUSE})(?![\d,.]\d)")
PLZ_CITY_RE = re.compile(rf"(?<![\d.,])(?:D-)?(0[1-9]\d{{3}}|[1-9]\d{{4}})\s+({_CAP}(?:[- ](?:an der|am|im|bei)?\s?{_CAP})?"
                         rf"(?:\s\((?:{_CAP}|Saale|Oder|Main)\))?)")

# Names: a cue, optional further titles, then one to three capitalised name words (with von/van/de/zu particles).
_CUE = (r"(?:Herrn?|Frau|Fr\.|Hr\.|Dr\.|Prof\.|Patientin|Patient|Pat\.|geb\.|Schwester|Pfleger|Oberarzt|"
        r"Oberärztin|Chefarzt|Chefärztin|Assistenzarzt|Assistenzärztin|Kollege|Kollegin)")
_TITLE = (r"(?:(?:(?:Dr|Prof|Dipl|PD|Priv\.-Doz)\.?|(?:med|dent|rer\.\s?nat|phil|habil|univ)\.)"
          r"(?:\s?(?:med|dent|rer\.\s?nat|phil|habil|-Med|-Psych)\.)*\s+)")
_NAME_WORD = r"(?:[A-ZÄÖÜ][^\W\d_]*[^\W\d_A-Z](?:-[A-ZÄÖÜ][^\W\d_]+)?|[A-ZÄÖÜ]\.)"
_NAMES = (rf"(?:(?:von|van|de|zu|von der|van der)[ \t]+)?{_NAME_WORD}"
          rf"(?:[ \t]+(?:(?:von|van|de|zu)[ \t]+)?{_NAME_WORD}){{0,2}}")  # one line: a name never wraps
_COLLEAGUE = r"(?:Kolleg(?:e|in)[ \t]+)"
_SALUTE = r"(?:(?:Herrn?|Frau|Hr\.|Fr\.)[ \t]+)?"
NAME_RE = re.compile(rf"(?<![\w-])({_CUE}:?[ \t]+{_SALUTE}{_COLLEAGUE}?{_TITLE}*)({_NAMES})")
# A role or relation noun, or a form label, before a full name ("Hausärztin Kerstin Vogel", "Tochter Petra Kühn",
# "Versicherte: Renate Vogt", "Name, Vorname: Wagner, Frieda"). These nouns are also followed by ordinary nouns
# ("hat der Kardiologe Untersuchungen veranlasst"), so they need two name words, neither a known medical term.
_ROLE = (r"(?:Haus|Stations|Fach|Zahn|Kinder|Not|Amts|Betriebs)?(?:arzt|ärztin|ärzte)|"
         r"(?:Neuro|Kardio|Pneumo|Gastroentero|Onko|Uro|Radio|Psycho|Nephro|Rheumato|Dermato|Gynäko)log(?:e|in|en)|"
         r"(?:Physio|Ergo|Psycho)?[Tt]herapeut(?:in)?|Hebamme|Betreuer(?:in)?|Sachbearbeiter(?:in)?|"
         r"Ansprechpartner(?:in)?|Kundenberater(?:in)?|Ehe(?:frau|mann)|Lebensgefährt(?:e|in)|Sohn|Tochter|Mutter|"
         r"Vater|Bruder|Enkel(?:in)?|Neffe|Nichte|Schwieger(?:tochter|sohn|mutter|vater)|Bezugsperson|"
         r"Kontoinhaber(?:in)?|Mitglied|Kind|Versicherte[nr]?|Versicherungsnehmer(?:in)?|Verletzte[nr]?|"
         r"Antragsteller(?:in)?|Betroffene[nr]?|Rehabilitand(?:in)?|Klient(?:in)?|Bewohner(?:in)?|Name|"
         r"Name,[ \t]?Vorname|Zuweiser(?:in)?")
_ROLE_WORD = re.compile(_ROLE)
ROLE_NAME_RE = re.compile(rf"(?<![\w-])((?:(?:{_ROLE}):?[ \t]+)+{_SALUTE}{_TITLE}*)({_NAME_WORD}[ \t]+(?:(?:von|van|de|zu)[ \t]+)?"
                          rf"{_NAME_WORD}(?:[ \t]+{_NAME_WORD})?)")
# Forms write "Surname, First name" after a label: "Patient: Pohl, Reinhard".
FORM_NAME_RE = re.compile(rf"(?<![\w-])((?:{_CUE}|{_ROLE}):[ \t]+{_SALUTE}{_TITLE}*)({_NAME_WORD},[ \t]{_NAME_WORD})(?![\w-])")
# A name on the line of an address in a letter's address block: "Gisela Horn, <ADDRESS>".
NAME_BEFORE_ADDRESS_RE = re.compile(rf"(^|\n)({_NAME_WORD}[ \t]+{_NAME_WORD})(?=,?[ \t]*\n?[ \t]*<ADDRESS>)")
# Capitalised words after a cue that are not names: titles, roles, German nouns that follow "Patient(in)".
_NOT_NAME = {"Doktor", "Professor", "Kollege", "Kollegin", "Patient", "Patientin", "Patienten", "Arzt", "Ärztin",
             "Dr.", "Prof.", "Med.", "Der", "Die", "Das", "Den", "Dem", "Des", "Ein", "Eine", "Einer", "Einen",
             "Mit", "Bei", "Im", "In", "Am", "An", "Auf", "Aus", "Nach", "Vor", "Von", "Zur", "Zum", "Und", "Oder",
             "Sie", "Er", "Es", "Ihr", "Ihre", "Sein", "Seine", "Wird", "Wurde", "Ist", "War", "Hat", "Hatte",
             "Kann", "Soll", "Muss", "Mit", "Ohne", "Über", "Unter", "Wegen", "Trotz", "Nicht", "Kein", "Keine",
             "Bitte", "Vielen", "Dank", "Liebe", "Lieber", "Sehr", "Geehrte", "Geehrter", "Alter", "Jahre",
             "Praxis", "Klinik", "Station", "Herr", "Frau", "Dr", "Prof"}


def _kvnr_valid(s: str) -> bool:
    """KVNR: the letter as two digits (A=01 ... Z=26) plus 8 digits form the payload; the 10th character is the
    sum of the payload digits weighted 1,2,1,2,... (products' digit sums) mod 10. That is the Luhn weighting of
    the payload, so stdnum's luhn checksum of payload + "0" equals the check digit."""
    from stdnum import luhn

    payload = f"{ord(s[0]) - 64:02d}{s[1:9]}"
    return int(s[9]) == luhn.checksum(payload + "0")


def _iban_valid(s: str) -> bool:
    from stdnum import iban

    return iban.is_valid(s)


def _tax_id_valid(s: str) -> bool:
    from stdnum.de import idnr

    return idnr.is_valid(s)


def _sub_if(rx: re.Pattern, tag: str, text: str, keep: Callable[[re.Match], bool] = lambda m: True,
            keep_cue: bool = False) -> tuple[str, int]:
    """Replace each match for which `keep` holds (only group 2 with `keep_cue`: group 1 is the cue and stays)."""
    n = 0

    def repl(m: re.Match) -> str:
        nonlocal n
        if not keep(m):
            return m.group(0)
        n += 1
        return (m.group(1) if keep_cue else "") + tag

    return rx.sub(repl, text), n


def _sub_valid(rx: re.Pattern, tag: str, ok: Callable[[str], bool], text: str) -> tuple[str, int]:
    return _sub_if(rx, tag, text, lambda m: ok(m.group(0)))


# International non-proprietary name stems: "der Patient Dexamethason 10 mg" names a drug, not a person.
_DRUG_STEM = re.compile(r"(?:mab|nib|pril|sartan|olol|statin|azol|cillin|mycin|cyclin|floxacin|son|solon|pam|lam|"
                        r"parin|xaban|gatran|tid|vir|gliptin|gliflozin|dipin|prazol|setron|triptan|profen|fenac|"
                        r"oxacin|platin|taxel|rubicin|umab|ximab|zumab|amin|olin|idin|azin|asid|mid|thiazid)$")
_DOSE_AFTER = re.compile(r"\s*\d+(?:[.,]\d+)?\s?(?:mg|µg|mcg|g|ml|IE|I\.E\.|mmol|%|Tbl|Hübe)\b")


def _medical_terms() -> frozenset[str]:
    global _TERMS
    if _TERMS is None:
        from definemed.eval.medical_terms import TERMS_DE

        _TERMS = frozenset(t.strip().lower() for t in TERMS_DE.splitlines() if t.strip() and not t.startswith("#"))
    return _TERMS


_TERMS: frozenset[str] | None = None


def _is_name(m: re.Match) -> bool:
    first = m.group(2).split()[0]
    if first in _NOT_NAME or re.fullmatch(r"(?:[A-ZÄÖÜ]\.\s*)+", m.group(2)):
        return False  # "Dr. med. K." is already anonymised
    if m.group(1).split()[0] not in ("Patient", "Patientin", "Pat."):
        return True  # "Herr Johnson" is a person, whatever his name ends with
    # after a role word the next noun may be what the patient receives: "erhält der Patient Dexamethason 10 mg"
    low = first.lower()
    return not (low in _medical_terms() or _DRUG_STEM.search(low) or _DOSE_AFTER.match(m.string, m.end()))


def _is_full_name(m: re.Match) -> bool:
    """After a role noun or form label: every word must look like a name, none a medical term or drug."""
    words = re.findall(r"[^\W\d_][^\W\d_.-]*(?:-[^\W\d_]+)?", m.group(2))
    terms = _medical_terms()
    return not any(w in _NOT_NAME or w.lower() in terms or _DRUG_STEM.search(w.lower()) or _ROLE_WORD.fullmatch(w)
                   for w in words)  # "Mutter Kind Beziehung": a role noun is no name


def _is_city(m: re.Match) -> bool:
    return m.group(2).split()[0].rstrip(".,") not in _NOT_CITY


def redact(text: str) -> tuple[str, dict[str, int]]:
    """(redacted text, count per kind). Every kind in KINDS has a count, zero when absent."""
    c: dict[str, int] = {}
    text, c["email"] = EMAIL_RE.subn(TAGS["email"], text)
    text, c["iban"] = _sub_valid(IBAN_RE, TAGS["iban"], _iban_valid, text)
    text, c["kvnr"] = _sub_valid(KVNR_RE, TAGS["kvnr"], _kvnr_valid, text)
    text, c["tax_id"] = _sub_valid(TAX_ID_RE, TAGS["tax_id"], _tax_id_valid, text)
    text, n4 = IPV4_RE.subn(TAGS["ip"], text)
    text, n6 = IPV6_RE.subn(TAGS["ip"], text)
    c["ip"] = n4 + n6
    text, c["date_of_birth"] = _sub_if(DOB_RE, TAGS["date_of_birth"], text, keep_cue=True)
    text, c["phone"] = PHONE_RE.subn(TAGS["phone"], text)
    text, n_street = STREET_RE.subn(TAGS["address"], text)
    text, n_ctx = _sub_if(STREET_PLZ_RE, TAGS["address"], text, lambda m: m.group("city") not in _NOT_CITY)
    text, n_cue = _sub_if(STREET_CUE_RE, TAGS["address"], text, keep_cue=True)
    text, n_plz = _sub_if(PLZ_CITY_RE, TAGS["address"], text, _is_city)
    c["address"] = n_street + n_ctx + n_cue + n_plz
    text, n_form = _sub_if(FORM_NAME_RE, TAGS["name"], text, _is_full_name, keep_cue=True)
    text, n_cue = _sub_if(NAME_RE, TAGS["name"], text, _is_name, keep_cue=True)
    text, n_role = _sub_if(ROLE_NAME_RE, TAGS["name"], text, _is_full_name, keep_cue=True)
    text, n_block = _sub_if(NAME_BEFORE_ADDRESS_RE, TAGS["name"], text, _is_full_name, keep_cue=True)
    c["name"] = n_form + n_cue + n_role + n_block
    return text, {k: c[k] for k in KINDS}


def redact_batch(batch):
    """map_batches step: redacts `text` and adds one `pii_<kind>` count column per kind."""
    import pyarrow as pa

    arrow = isinstance(batch, pa.Table)
    texts = batch.column("text").to_pylist() if arrow else batch["text"].tolist()
    out, counts = [], {k: [] for k in KINDS}
    for t in texts:
        r, c = redact(t)
        out.append(r)
        for k in KINDS:
            counts[k].append(c[k])
    if arrow:
        batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(out, type=pa.string()))
        for k in KINDS:
            batch = batch.append_column(f"pii_{k}", pa.array(counts[k], type=pa.int64()))
        return batch
    batch = batch.copy()
    batch["text"] = out
    for k in KINDS:
        batch[f"pii_{k}"] = counts[k]
    return batch
