"""Plausible values for the fields of a CC spec definition.

The spec gives names, types, formats and enums but no examples. A field's *name* says more than
its type (``zip`` is a string, but a 5-digit one), so this module picks a generator by name first,
then by format/type. Everything draws from a ``random.Random`` the caller seeds, so the same seed
gives the same values. Used once per entity to build a small pool of record *variants* (see
``simulator.data``); the hot path never walks the schema.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

#: Nested objects deeper than this are left out: previews of previews add bytes, not realism.
MAX_DEPTH = 2
#: Arrays of objects get 0..MAX_ITEMS items.
MAX_ITEMS = 2

FIRST = ("James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard Susan "
         "Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty Anthony Sandra "
         "Mark Margaret Donald Ashley Steven Kimberly Andrew Emily Paul Donna Joshua Michelle Kenneth Carol "
         "Kevin Amanda Brian Melissa George Deborah Timothy Stephanie Ronald Rebecca Jason Sharon Edward Laura "
         "Jeffrey Cynthia Ryan Dorothy Jacob Amy Gary Kathleen Nicholas Angela Eric Shirley Jonathan Emma "
         "Stephen Brenda Larry Pamela Justin Nicole Scott Anna Brandon Samantha Benjamin Katherine Samuel "
         "Christine Gregory Debra Alexander Rachel Patrick Carolyn Frank Janet Raymond Maria").split()
LAST = ("Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez "
        "Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark "
        "Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams "
        "Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips Evans Turner Diaz Parker "
        "Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper "
        "Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson Watson Brooks Chavez Wood James "
        "Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo Sanders Patel Myers").split()
CITIES = ("Austin Boston Chicago Denver Houston Phoenix Seattle Portland Atlanta Miami Dallas Tampa Raleigh "
          "Nashville Columbus Omaha Tucson Madison Richmond Albany").split()
STATES = "TX MA IL CO TX AZ WA OR GA FL TX FL NC TN OH NE AZ WI VA NY".split()
STREETS = "Oak Maple Cedar Pine Elm Lake Hill Main Park Washington".split()
WORDS = ("screening baseline follow-up dose safety efficacy randomized cohort protocol placebo oncology "
         "cardiology renal hepatic pediatric adult titration extension open-label blinded observational "
         "infusion assessment laboratory imaging consent eligibility adverse visit window").split()
THERAPY = ("Oncology Cardiology Neurology Dermatology Endocrinology Immunology Nephrology Psychiatry "
           "Rheumatology Vaccines").split()
#: study statuses; also the names of the first entries of /system/study-statuses (job 132), so a
#: study's status is one the instance has configured
STATUSES = ("Active", "Enrolling", "Closed", "Pending", "Completed", "On Hold", "Start-up", "Terminated")
RACES = ("White", "Black or African American", "Asian", "American Indian or Alaska Native",
         "Native Hawaiian or Other Pacific Islander", "Other")
ETHNICITIES = ("Hispanic or Latino", "Not Hispanic or Latino", "Unknown")
#: Base data is dated in the six years before the simulator's clock start.
EPOCH = datetime(2025, 12, 1, tzinfo=UTC)


def iso(dt: datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z`` -- the one timestamp format the simulator emits."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def uuid_from(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"


def sentence(rng: random.Random, lo: int = 4, hi: int = 10) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return (" ".join(words)).capitalize() + "."


class ValueFactory:
    """Generates a JSON value for a property schema of the spec's ``definitions``."""

    def __init__(self, definitions: dict[str, Any]):
        self.definitions = definitions

    def record(self, definition: str, rng: random.Random, depth: int = 0) -> dict[str, Any]:
        props = self.definitions[definition].get("properties", {})
        out: dict[str, Any] = {}
        person = (rng.choice(FIRST), rng.choice(LAST))
        for name, schema in props.items():
            value = self.value(name, schema, rng, depth, person)
            if value is not _OMIT:
                out[name] = value
        return out

    def value(self, name: str, schema: dict[str, Any], rng: random.Random, depth: int = 0,
              person: tuple[str, str] | None = None) -> Any:
        person = person or (rng.choice(FIRST), rng.choice(LAST))
        ref = schema.get("$ref")
        if ref:
            if depth >= MAX_DEPTH:
                return _OMIT
            return self.record(ref.rsplit("/", 1)[-1], rng, depth + 1)
        typ = schema.get("type")
        if typ == "array":
            items = schema.get("items", {})
            if items.get("$ref"):
                if depth >= MAX_DEPTH:
                    return []
                return [self.value(name, items, rng, depth, None) for _ in range(rng.randint(0, MAX_ITEMS))]
            return [self.value(name, items, rng, depth, person) for _ in range(rng.randint(0, 3))]
        if "enum" in schema:
            return rng.choice(schema["enum"])
        if typ == "boolean":
            return rng.random() < 0.5
        if typ == "integer":
            return self._integer(name, rng)
        if typ == "number":
            return round(rng.uniform(10, 5000), 2)
        fmt = schema.get("format")
        if fmt == "date-time":
            return iso(EPOCH - timedelta(seconds=rng.randint(3600, 6 * 365 * 86400)))
        if fmt == "uuid":
            return uuid_from(rng)
        return self._string(name, rng, person)

    @staticmethod
    def _integer(name: str, rng: random.Random) -> int:
        low = name.lower()
        if low.endswith("id") or low == "id":
            return rng.randint(1, 99_999)
        if "minutes" in low or "time" in low:
            return rng.choice((15, 30, 45, 60, 90, 120))
        if "year" in low:
            return rng.randint(2010, 2025)
        if "count" in low or "quantity" in low:
            return rng.randint(0, 40)
        return rng.randint(0, 100)

    @staticmethod
    def _string(name: str, rng: random.Random, person: tuple[str, str]) -> str:  # noqa: C901 - a lookup table
        low = name.lower()
        first, last = person
        if "email" in low:
            return f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@example.org"
        if "phone" in low or "fax" in low or "mobile" in low or low == "rawnumber" or low == "number":
            return f"(555) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
        if low in ("zip", "postalcode"):
            return f"{rng.randint(10000, 99999)}"
        if low == "state":
            return rng.choice(STATES)
        if low == "city":
            return rng.choice(CITIES)
        if low == "country":
            return "United States"
        if low == "address1":
            return f"{rng.randint(1, 9999)} {rng.choice(STREETS)} St"
        if low in ("address2", "address3"):
            return rng.choice(("", "", f"Suite {rng.randint(100, 900)}"))
        if low in ("firstname",):
            return first
        if low in ("lastname",):
            return last
        if low in ("middlename",):
            return rng.choice(("", "A.", "J.", "M."))
        if low in ("displayname", "fullname", "providername", "referrername"):
            return f"{first} {last}"
        if low in ("login", "username"):
            return f"{first[0].lower()}{last.lower()}"
        if "url" in low:
            return f"https://example.org/{last.lower()}"
        if "color" in low:
            return f"#{rng.randint(0, 0xFFFFFF):06X}"
        if "currency" in low:
            return "USD"
        if low == "gendercode" or low == "gender":
            return rng.choice(("M", "F"))
        if low == "race":
            return rng.choice(RACES)
        if low == "ethnicity":
            return rng.choice(ETHNICITIES)
        if low == "status":
            return rng.choice(STATUSES)
        if low in ("phase",):
            return rng.choice(("Phase I", "Phase II", "Phase III", "Phase IV"))
        if low in ("category", "subcategory", "studygroup"):
            return rng.choice(THERAPY)
        if "number" in low or "code" in low or low in ("cpt", "mnemonic", "identifier", "tag", "reference"):
            return f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(1000, 99999)}"
        if low in ("comment", "comments", "description", "note", "narrative", "query", "reason", "tooltip",
                   "statusreason") or low.endswith("note"):
            return sentence(rng)
        if low == "title":
            return f"A {rng.choice(('randomized', 'open-label', 'double-blind'))} study of {rng.choice(WORDS)} in {rng.choice(THERAPY).lower()}"
        if "name" in low:
            return f"{rng.choice(WORDS).capitalize()} {rng.choice(WORDS)}"
        if "date" in low:
            return iso(EPOCH - timedelta(days=rng.randint(1, 2000)))[:10]
        return rng.choice(WORDS)


class _Omit:
    def __repr__(self) -> str:
        return "<omit>"


_OMIT: Any = _Omit()
