"""Car class names → make, model, body, year; and the canonical (official Stanford Cars) spelling of a name.

The 196 official classes ship as data (`stanford_cars_classes.csv`, curated: a few names carry no body
type, e.g. "Chevrolet Corvette ZR1 2012", and got one by hand). Any other name goes through `parse_name`,
which knows multi-word makes ("Aston Martin", "Land Rover", "Mercedes-Benz" …) and falls back to
make = first word, flagged, when the make is not one it knows.
"""

from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

CSV_NAME = "stanford_cars_classes.csv"
CSV_COLUMNS = ["class_name", "make", "model", "body", "year"]

# Multi-word makes first: the longest match wins ("Land Rover" before "Land").
MULTI_WORD_MAKES = (
    "AM General",
    "Alfa Romeo",
    "Aston Martin",
    "De Tomaso",
    "Great Wall",
    "Land Rover",
    "Lynk & Co",
    "Mercedes Benz",
    "Mercedes-AMG",
    "Mercedes-Benz",
    "Rolls Royce",
    "Rolls-Royce",
    "Range Rover",
)
SINGLE_WORD_MAKES = [
    "Acura",
    "Audi",
    "BMW",
    "Bentley",
    "Bugatti",
    "Buick",
    "BYD",
    "Cadillac",
    "Chevrolet",
    "Chrysler",
    "Citroen",
    "Cupra",
    "Dacia",
    "Daewoo",
    "Daihatsu",
    "Datsun",
    "Dodge",
    "Eagle",
    "FIAT",
    "Ferrari",
    "Fisker",
    "Ford",
    "GMC",
    "Genesis",
    "Geo",
    "Holden",
    "Honda",
    "HUMMER",
    "Hyundai",
    "Infiniti",
    "Isuzu",
    "Jaguar",
    "Jeep",
    "Kia",
    "Lada",
    "Lamborghini",
    "Lancia",
    "Lexus",
    "Lincoln",
    "Lotus",
    "MG",
    "MINI",
    "Maserati",
    "Maybach",
    "Mazda",
    "McLaren",
    "Mercedes",
    "Mercury",
    "Mitsubishi",
    "Nissan",
    "Oldsmobile",
    "Opel",
    "Peugeot",
    "Plymouth",
    "Polestar",
    "Pontiac",
    "Porsche",
    "Ram",
    "Renault",
    "Rivian",
    "Saab",
    "Saturn",
    "Scion",
    "SEAT",
    "Skoda",
    "Smart",
    "Spyker",
    "Subaru",
    "Suzuki",
    "Tesla",
    "Toyota",
    "Vauxhall",
    "Volkswagen",
    "VW",
    "Volvo",
]
# Body types as they appear at the end of a name (before the year); longest first when matching.
BODY_TYPES = (
    "Crew Cab",
    "Extended Cab",
    "Regular Cab",
    "Quad Cab",
    "Club Cab",
    "SuperCab",
    "Cargo Van",
    "Minivan",
    "Van",
    "SUV",
    "Sedan",
    "Coupe",
    "Convertible",
    "Hatchback",
    "Wagon",
    "Pickup",
    "Roadster",
    "Cabriolet",
    "Estate",
    "Limousine",
)
_YEAR = re.compile(r"^(19|20)\d\d$")


@dataclass(frozen=True)
class CarName:
    """One class name broken down. `fallback` = the make was not recognised (make is the first word)."""

    class_name: str
    make: str
    model: str
    body: str  # "" when the name carries none
    year: int | None
    fallback: bool = False

    @property
    def make_model(self) -> str:
        return f"{self.make} {self.model}".strip()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _key(name: str) -> str:
    """Spelling-insensitive key: "Ram C-V Cargo Van Minivan 2012" and "Ram C/V …" share one."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _match_make(words: list[str]) -> tuple[str, int] | None:
    low = [w.lower() for w in words]
    for make in sorted(MULTI_WORD_MAKES, key=len, reverse=True):
        mw = make.lower().split()
        if low[: len(mw)] == mw:
            return " ".join(words[: len(mw)]), len(mw)
    known = {m.lower() for m in SINGLE_WORD_MAKES}
    if low and low[0] in known:
        return words[0], 1
    return None


def parse_name(name: str) -> CarName:
    """Parse any "Make Model [Body] [Year]" class name; never raises (unknown make → first word, flagged)."""
    words = name.split()
    if not words:
        return CarName(name, "", "", "", None, fallback=True)
    year = None
    if _YEAR.match(words[-1]):
        year = int(words[-1])
        words = words[:-1]
    found = _match_make(words)
    fallback = found is None
    make, n = found if found is not None else (words[0], 1)
    rest = words[n:]
    body, best = "", (0, 0, 0)  # (end, length, start) of the body phrase that ends last, longest on ties
    low = [w.lower() for w in rest]
    for b in BODY_TYPES:
        bw = b.lower().split()
        for i in range(len(rest) - len(bw), 0, -1):  # never the first model word ("Van" models exist)
            if low[i : i + len(bw)] == bw:
                if (i + len(bw), len(bw)) > best[:2]:
                    body, best = b, (i + len(bw), len(bw), i)
                break
    if body:
        end, _, i = best
        rest = rest[:i] + rest[end:]
    return CarName(name, make, " ".join(rest), body, year, fallback)


@lru_cache(maxsize=1)
def official_classes() -> dict[str, CarName]:
    """The 196 official Stanford Cars classes from the shipped CSV, by name (in the official order)."""
    text = resources.files("carspotter.data").joinpath(CSV_NAME).read_text("utf-8")
    out: dict[str, CarName] = {}
    for row in csv.DictReader(text.splitlines()):
        out[row["class_name"]] = CarName(
            row["class_name"],
            row["make"],
            row["model"],
            row["body"],
            int(row["year"]) if row["year"] else None,
        )
    return out


@lru_cache(maxsize=1)
def _official_by_key() -> dict[str, str]:
    return {_key(n): n for n in official_classes()}


def canonical_name(name: str) -> str:
    """The official spelling of a class name when it is one of the 196 written another way, else `name`."""
    name = " ".join(name.split())
    if name in official_classes():
        return name
    return _official_by_key().get(_key(name), name)


def describe(name: str) -> CarName:
    """Make/model/body/year of a class name: the shipped table for official names, else the parser."""
    official = official_classes().get(canonical_name(name))
    if official is not None:
        return CarName(name, official.make, official.model, official.body, official.year)
    return parse_name(name)


def describe_all(names: list[str]) -> list[CarName]:
    return [describe(n) for n in names]


def taxonomy_summary(names: list[str]) -> dict[str, Any]:
    """For `data prepare`'s summary: how many makes, and which names fell back to make = first word."""
    parts = describe_all(names)
    return {
        "n_makes": len({p.make for p in parts}),
        "n_models": len({p.make_model for p in parts}),
        "bodies": sorted({p.body for p in parts if p.body}),
        "years": sorted({p.year for p in parts if p.year is not None}),
        "n_without_body": sum(1 for p in parts if not p.body),
        "n_without_year": sum(1 for p in parts if p.year is None),
        "fallback": [p.class_name for p in parts if p.fallback],
    }
