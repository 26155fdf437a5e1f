"""The shipped class taxonomy (make/model/body/year) and the name parser for other datasets."""

from __future__ import annotations

import csv
from importlib import resources

from carspotter.data.taxonomy import (
    CSV_NAME,
    canonical_name,
    describe,
    official_classes,
    parse_name,
    taxonomy_summary,
)


def _rows() -> list[dict[str, str]]:
    text = resources.files("carspotter.data").joinpath(CSV_NAME).read_text("utf-8")
    return list(csv.DictReader(text.splitlines()))


def test_shipped_csv_covers_the_196_official_classes() -> None:
    rows = _rows()
    assert len(rows) == 196 and len({r["class_name"] for r in rows}) == 196
    assert len({r["make"] for r in rows}) == 49
    years = {int(r["year"]) for r in rows}
    assert min(years) == 1991 and max(years) == 2012 and all(1991 <= y <= 2012 for y in years)
    bodies = {r["body"] for r in rows}
    assert bodies == {
        "SUV", "Sedan", "Coupe", "Convertible", "Hatchback", "Wagon", "Minivan", "Van", "Cargo Van",
        "Crew Cab", "Extended Cab", "Regular Cab", "Quad Cab", "Club Cab", "SuperCab",
    }  # fmt: skip
    assert all(r["model"] and r["make"] for r in rows)
    # every official name is also the key of a distinct spelling-insensitive entry
    assert len({canonical_name(r["class_name"]) for r in rows}) == 196


def test_parser_agrees_with_the_table_and_never_falls_back_on_official_names() -> None:
    s = taxonomy_summary(list(official_classes()))
    assert s["fallback"] == [] and s["n_makes"] == 49 and s["n_without_body"] == 0
    for name, row in official_classes().items():
        p = parse_name(name)
        assert not p.fallback, name
        assert (p.make, p.year) == (row.make, row.year), name
        if p.body:  # names that carry a body type parse to the table's make/model/body exactly
            assert (p.model, p.body) == (row.model, row.body), name


def test_examples_and_multi_word_makes() -> None:
    c = describe("Chevrolet Silverado 1500 Extended Cab 2012")
    assert (c.make, c.model, c.body, c.year) == ("Chevrolet", "Silverado 1500", "Extended Cab", 2012)
    assert describe("Chevrolet Express Cargo Van 2007").body == "Cargo Van"
    r = describe("Rolls-Royce Phantom Drophead Coupe Convertible 2012")
    assert (r.make, r.model, r.body) == ("Rolls-Royce", "Phantom Drophead Coupe", "Convertible")
    for name, make in [
        ("Aston Martin DB11 Coupe 2019", "Aston Martin"),
        ("Land Rover Defender SUV 2020", "Land Rover"),
        ("Mercedes-Benz GLC-Class SUV 2018", "Mercedes-Benz"),
        ("AM General Hummer SUV 2000", "AM General"),
        ("Rolls-Royce Cullinan SUV 2019", "Rolls-Royce"),
        ("Alfa Romeo Giulia Sedan 2017", "Alfa Romeo"),
    ]:
        p = parse_name(name)
        assert (p.make, p.fallback) == (make, False), name
        assert p.body and p.year and p.model, name
    # a body word as the first model word is the model, not the body
    assert parse_name("Volkswagen Van 1985").model == "Van"
    # no year, no body: still parsed
    p = parse_name("Toyota Supra")
    assert (p.make, p.model, p.body, p.year, p.fallback) == ("Toyota", "Supra", "", None, False)


def test_unknown_make_falls_back_to_the_first_word_flagged() -> None:
    p = parse_name("Zastava Yugo Hatchback 1988")
    assert (p.make, p.model, p.body, p.year, p.fallback) == ("Zastava", "Yugo", "Hatchback", 1988, True)
    s = taxonomy_summary(["Zastava Yugo Hatchback 1988", "Audi A5 Coupe 2012"])
    assert s["fallback"] == ["Zastava Yugo Hatchback 1988"] and s["n_makes"] == 2


def test_canonical_names_undo_repack_renames() -> None:
    assert canonical_name("Ram C-V Cargo Van Minivan 2012") == "Ram C/V Cargo Van Minivan 2012"
    assert canonical_name("ram c/v cargo van minivan 2012") == "Ram C/V Cargo Van Minivan 2012"
    assert canonical_name("Audi TTS Coupe 2012") == "Audi TTS Coupe 2012"
    assert canonical_name("Not A Car 2012") == "Not A Car 2012"
    d = describe("Ram C-V Cargo Van Minivan 2012")
    assert (d.make, d.model, d.body, d.year) == ("Ram", "C/V Cargo Van", "Minivan", 2012)


def test_prepare_summary_says_when_makes_fall_back(tmp_path) -> None:
    from carspotter.data.prepare import format_summary, prepare
    from conftest import make_tiny_prepared

    src = make_tiny_prepared(tmp_path / "src", n_classes=2, per_class=4)
    s = prepare(src / "manifest.csv", tmp_path / "out", workers=1, val_fraction=0)
    assert s["taxonomy"]["fallback"] == ["Class 0", "Class 1"]
    assert any("make we do not know" in n and "'Class 0'" in n for n in s["notes"])
    assert "2 name(s) with an unknown make (make = first word)" in format_summary(s)
