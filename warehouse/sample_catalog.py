"""A deterministic sample retailer catalog for ``make demo``: products, images, videos, near-duplicates, bad rows.

Nothing is downloaded: text comes from templates over invented brands, images are drawn with PIL, videos are
encoded with PyAV from those images. The catalog is written in a *retailer* export format, not the canonical
row (see ``FIELD_MAP``), so the ingest flow has real mapping, validation and quarantine work to do.

Written under ``out_dir``:

- ``catalog.jsonl``: one retailer JSON object per line, good rows with deliberately bad ones among them
  (``bad_rows.json`` says which line fails and why, with ``warehouse.quarantine.Reason`` codes).
  Media paths are relative to the catalog file's folder.
- ``catalog.csv``: the good rows as a CSV export (nested columns ``CSV_JSON_COLUMNS`` as JSON strings) plus
  one row with a wrong number of columns (``bad_rows_csv.json``).
- ``images/*.jpg`` (256x256), ``videos/*.mp4`` (2 s, 10 fps, 256x256).
- ``duplicates_truth.csv``: ground-truth near-duplicate pairs ``sku_a,sku_b``.

Rows carry ``tagged_attributes`` (canonical ``labels``): one entry per attribute occurrence with character
offsets into ``title``/``description``, ``field="specs"`` for a spec-table entry, and ``field=None`` for an
implicit value (visible only in the image, e.g. the colour or the sleeve length).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import random
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Retailer export column -> canonical field (warehouse.schema.CANONICAL_FIELDS). Columns not listed here
# (``vendor_score``, ``warehouse_bin``) are unknown to the canonical schema and belong in ``extra``.
FIELD_MAP: dict[str, str] = {
    "sku": "product_id",
    "name": "title",
    "description": "description",
    "product_type": "category",
    "attributes": "specs",  # {key: value} or [{"name": key, "value": value}, ...]
    "image_urls": "images",
    "video_urls": "videos",
    "tagged_attributes": "labels",
    "updated_at": "updated_at",
}
EXTRA_COLUMNS: tuple[str, ...] = ("vendor_score", "warehouse_bin")
CSV_COLUMNS: tuple[str, ...] = tuple(FIELD_MAP) + EXTRA_COLUMNS
CSV_JSON_COLUMNS: tuple[str, ...] = ("attributes", "image_urls", "video_urls", "tagged_attributes")

IMAGE_SIZE = 256
VIDEO_SIZE = 256
VIDEO_FPS = 10
VIDEO_SECONDS = 2
VIDEO_CODECS = ("libx264", "h264", "mpeg4")  # first one this FFmpeg build can encode wins
MIN_PRODUCTS = 30  # room for every bad-row kind with good rows between them
LONG_TITLE_CHARS = 1_000_000

# --------------------------------------------------------------------------------------------------------------
# Vocabulary: invented brands, a colour palette (name -> RGB) and product families.

BRANDS: tuple[str, ...] = (
    "Northwind",
    "Bluepeak",
    "Kestrel",
    "Lumora",
    "Oakridge",
    "Veyra",
    "Tidewell",
    "Corvo",
    "Harbor & Pine",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "Black": (30, 30, 34),
    "White": (236, 236, 232),
    "Navy Blue": (28, 44, 92),
    "Red": (196, 36, 40),
    "Forest Green": (34, 98, 58),
    "Grey": (128, 130, 134),
    "Beige": (214, 196, 160),
    "Pink": (236, 140, 170),
    "Mustard Yellow": (222, 172, 40),
    "Sky Blue": (110, 170, 226),
}

APPAREL_MATERIALS = ("Cotton", "Organic Cotton", "Linen", "Polyester", "Viscose", "Jersey")
SLEEVES = ("Short Sleeve", "Long Sleeve", "Sleeveless", "3/4 Sleeve")
NECKLINES = ("Crew Neck", "V-Neck", "Scoop Neck")
PATTERNS = ("Solid", "Striped", "Polka Dot", "Floral")
SIZE_RANGES = ("XS-XL", "S-XXL", "XS-XXL", "S-L")
GARMENT_LENGTHS = ("Mini", "Midi", "Maxi")
SHOE_MATERIALS = ("Leather", "Suede", "Canvas", "Mesh")
CLOSURES = ("Lace-Up", "Slip-On", "Zip", "Buckle")
DRINK_MATERIALS = ("Ceramic", "Stainless Steel", "Glass", "Enamel")
CONNECTORS = ("USB-C to USB-C", "USB-A to USB-C", "USB-C to Lightning", "USB-A to Micro-USB")
CABLE_LENGTHS = ("0.5 m", "1 m", "2 m", "3 m")
WATTAGES = ("20 W", "30 W", "45 W", "65 W", "100 W")

# Spec-table key for each attribute (the retailer's wording); attribute names are the canonical label names.
SPEC_KEYS: dict[str, str] = {
    "brand": "Brand",
    "colour": "Colour",
    "material": "Material",
    "sleeve_length": "Sleeve Length",
    "neckline": "Neckline",
    "pattern": "Pattern",
    "size_range": "Sizes",
    "garment_length": "Length",
    "closure": "Closure",
    "heel_height": "Heel Height",
    "capacity": "Capacity",
    "connector": "Connector",
    "cable_length": "Cable Length",
    "wattage": "Power",
}
# Attributes an image shows, so they may be left out of the text entirely (implicit values).
VISUAL_ATTRIBUTES = frozenset({"colour", "sleeve_length", "pattern", "garment_length"})

# Extra spec rows that are not labelled attributes (and use no attribute vocabulary).
OTHER_SPECS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "apparel": (
        ("Care", ("Machine wash at 30°C", "Hand wash only", "Do not tumble dry")),
        ("Fit", ("Regular", "Relaxed", "Slim")),
    ),
    "shoes": (("Sole", ("Rubber", "EVA foam", "TPU")), ("Width", ("Standard", "Wide"))),
    "drinkware": (("Dishwasher Safe", ("Yes", "No")), ("Lid", ("None", "Screw lid", "Flip lid"))),
    "electronics": (("Warranty", ("1 year", "2 years")), ("Certification", ("CE", "CE, FCC", "CE, UKCA"))),
}

# Description sentence templates per attribute; "{v}" is the value exactly as labelled (case may change).
SENTENCES: dict[str, tuple[str, ...]] = {
    "brand": ("Designed by {v}.", "Another favourite from {v}."),
    "colour": ("Finished in {v}.", "This one comes in {v}.", "The {v} shade pairs with almost anything."),
    "material": ("Made from soft {v}.", "Crafted in {v} for everyday use.", "The {v} body is built to last."),
    "sleeve_length": ("A {v} cut keeps it easy to layer.", "Cut with a {v} design."),
    "neckline": ("The {v} neckline flatters every shape.", "Finished with a classic {v}."),
    "pattern": ("A {v} print adds character.", "Features an eye-catching {v} pattern."),
    "size_range": ("Available in sizes {v}.", "Sizes run {v}."),
    "garment_length": ("A {v} length that moves with you.", "The {v} length works from day to evening."),
    "closure": ("A {v} closure makes it quick to put on.", "Secured with a {v} fastening."),
    "heel_height": ("Sits on a {v} heel.", "The {v} heel keeps you comfortable all day."),
    "capacity": ("Holds {v} of your favourite drink.", "A generous {v} capacity."),
    "connector": ("Connects {v}.", "Uses a {v} connection."),
    "cable_length": ("The {v} cable reaches from desk to sofa.", "A {v} reach for travel or home."),
    "wattage": ("Delivers up to {v} of fast charging.", "Rated at {v} output."),
}
FILLERS = (
    "Perfect for everyday use.",
    "A customer favourite season after season.",
    "Thoughtfully designed and built to last.",
    "Great as a gift.",
)


@dataclass(frozen=True)
class Family:
    """One product type: its category path, how its title reads, and which attributes it has."""

    name: str  # t_shirt, dress, ...
    group: str  # apparel | shoes | drinkware | electronics
    category: str  # the retailer's product_type
    nouns: tuple[str, ...]  # the product noun in titles
    code: str  # sku prefix


FAMILIES: tuple[Family, ...] = (
    Family("t_shirt", "apparel", "Apparel > Tops > T-Shirts", ("T-Shirt",), "TS"),
    Family("dress", "apparel", "Apparel > Dresses", ("Dress",), "DR"),
    Family("skirt", "apparel", "Apparel > Skirts", ("Skirt",), "SK"),
    Family("sneaker", "shoes", "Shoes > Sneakers", ("Sneakers", "Trainers"), "SN"),
    Family("pump", "shoes", "Shoes > Heels", ("Pumps", "Court Shoes"), "PU"),
    Family("boot", "shoes", "Shoes > Boots", ("Ankle Boots", "Boots"), "BO"),
    Family("mug", "drinkware", "Home > Kitchen > Mugs", ("Coffee Mug", "Mug"), "MG"),
    Family("bottle", "drinkware", "Home > Kitchen > Water Bottles", ("Water Bottle", "Bottle"), "WB"),
    Family("cable", "electronics", "Electronics > Accessories > Cables", ("Charging Cable", "Cable"), "CB"),
    Family("charger", "electronics", "Electronics > Accessories > Chargers", ("Wall Charger", "Charger"), "CH"),
)
FAMILY_WEIGHTS = (3, 2, 1.5, 1.5, 1, 1, 1.5, 1, 1.5, 1)


@dataclass(frozen=True)
class SampleCatalog:
    """What ``generate`` wrote: paths (all under ``root``) and counts."""

    root: Path
    catalog_path: Path  # catalog.jsonl
    csv_path: Path  # catalog.csv
    images_dir: Path
    videos_dir: Path
    bad_rows_path: Path  # bad_rows.json: [{line, sku, expected_reason}] for catalog.jsonl
    csv_bad_rows_path: Path  # bad_rows_csv.json: the same for catalog.csv (line 1 is the header)
    duplicates_truth_path: Path  # duplicates_truth.csv: sku_a,sku_b
    n_rows: int  # lines in catalog.jsonl
    n_good_rows: int  # rows that should ingest with all their media (includes near-duplicates)
    n_bad_rows: int
    n_near_duplicates: int
    n_images: int  # image files written (including the deliberately broken ones)
    n_videos: int  # playable videos written
    video_codec: str


# --------------------------------------------------------------------------------------------------------------
# Text: attributes -> title, description, spec table, labels.


@dataclass
class Product:
    """One generated listing, before it is written in the retailer format."""

    sku: str
    family: Family
    attrs: dict[str, str]  # canonical attribute name -> value
    title: str
    description: str
    specs: list[tuple[str, str]]
    spec_as_list: bool  # export the spec table as [{"name", "value"}] instead of a dict
    updated_at: str
    vendor_score: float
    warehouse_bin: str
    images: list[str]
    videos: list[str]


def _sample_attrs(fam: Family, rng: random.Random) -> dict[str, str]:
    a: dict[str, str] = {"brand": rng.choice(BRANDS), "colour": rng.choice(list(COLOURS))}
    if fam.group == "apparel":
        a["material"] = rng.choice(APPAREL_MATERIALS)
        a["pattern"] = rng.choices(PATTERNS, weights=(5, 2, 1, 1))[0]
        a["size_range"] = rng.choice(SIZE_RANGES)
        if fam.name in ("t_shirt", "dress"):
            a["sleeve_length"] = rng.choice(SLEEVES)
            a["neckline"] = rng.choice(NECKLINES)
        if fam.name in ("dress", "skirt"):
            a["garment_length"] = rng.choice(GARMENT_LENGTHS)
    elif fam.group == "shoes":
        a["material"] = rng.choice(SHOE_MATERIALS[:2] if fam.name == "pump" else SHOE_MATERIALS)
        closures = {"sneaker": ("Lace-Up", "Slip-On"), "pump": ("Slip-On", "Buckle"), "boot": CLOSURES}[fam.name]
        a["closure"] = rng.choice(closures)
        heel = {"sneaker": (2, 3), "boot": (2, 3, 4, 5), "pump": (5, 7, 8, 10)}[fam.name]
        a["heel_height"] = f"{rng.choice(heel)} cm"
    elif fam.group == "drinkware":
        a["material"] = rng.choice(("Ceramic", "Enamel", "Glass") if fam.name == "mug" else DRINK_MATERIALS[1:])
        ml = rng.choice((250, 300, 350, 450) if fam.name == "mug" else (500, 600, 750, 1000))
        a["capacity"] = f"{ml} ml" if rng.random() < 0.6 else f"{round(ml / 29.57)} oz"
    else:
        a["connector"] = rng.choice(CONNECTORS) if fam.name == "cable" else rng.choice(("USB-C", "USB-A", "Dual USB-C"))
        a["wattage"] = rng.choice(WATTAGES)
        if fam.name == "cable":
            a["cable_length"] = rng.choice(CABLE_LENGTHS)
        a["colour"] = rng.choice(("Black", "White", "Grey", "Navy Blue", "Red"))
    return a


def _title(fam: Family, a: dict[str, str], rng: random.Random) -> tuple[str, set[str]]:
    """A title over a random subset of the attributes; returns it and the attributes it names."""
    use = {k for k in a if k not in ("brand",) and rng.random() < 0.65}
    use.add("brand")
    if rng.random() < 0.75:
        use.add("colour")
    noun = rng.choice(fam.nouns)

    def part(k: str) -> list[str]:
        return [a[k]] if k in use and k in a else []

    words: list[str] = [a["brand"]]
    if fam.group == "apparel":
        if fam.name == "t_shirt" or rng.random() < 0.3:
            words.append(rng.choice(("Women's", "Men's", "Unisex")) if fam.name == "t_shirt" else "Women's")
        pattern = part("pattern") if a.get("pattern") != "Solid" else []
        words += pattern + part("material") + part("sleeve_length") + part("neckline") + part("garment_length")
        words.append(noun)
        if "size_range" in use:
            words.append(f"({a['size_range']})")
    elif fam.group == "shoes":
        words += [rng.choice(("Women's", "Men's"))] if fam.name != "pump" else ["Women's"]
        words += part("material") + part("closure") + [noun]
        if "heel_height" in use:
            words.append(f"with {a['heel_height']} Heel")
    elif fam.group == "drinkware":
        words += part("capacity") + part("material") + [noun]
    else:
        words += part("wattage") + part("connector") + [noun] + part("cable_length")
    title = " ".join(words)
    if "colour" in use:
        title += rng.choice((" - ", ", ", " in ")) + a["colour"]
    used = {k for k in use if k in a and (k != "pattern" or a["pattern"] != "Solid")}
    return title, used


def _description(a: dict[str, str], in_title: set[str], rng: random.Random) -> tuple[str, set[str]]:
    """1-3 sentences, mostly about attributes the title does not name; returns it and the attributes it names."""
    rest = [k for k in a if k not in in_title]
    named = [k for k in a if k in in_title]
    rng.shuffle(rest)
    rng.shuffle(named)
    pick = rest[: rng.randint(1, 3)] + named[: rng.choice((0, 0, 1))]
    pick = [k for k in pick if rng.random() < 0.8][:3]
    sentences = [rng.choice(_templates(k, a[k])).format(v=_surface(k, a[k], rng)) for k in pick]
    if not sentences or rng.random() < 0.3:
        sentences.append(rng.choice(FILLERS))
    return " ".join(sentences), set(pick)


def _templates(attr: str, value: str) -> tuple[str, ...]:
    if attr == "pattern" and value == "Solid":
        return ("A {v} colour keeps it simple.", "Plain and {v}, easy to style.")
    return SENTENCES[attr]


def _surface(attr: str, value: str, rng: random.Random) -> str:
    """The value as a sentence would write it (lower case mid-sentence, except brands and units)."""
    if attr in ("brand", "size_range", "connector", "capacity", "cable_length", "wattage", "heel_height"):
        return value
    return value.lower() if rng.random() < 0.7 else value


def _specs(fam: Family, a: dict[str, str], in_text: set[str], rng: random.Random) -> list[tuple[str, str]]:
    """The spec table: attributes the text lacks (unless left implicit), some repeats, and non-attribute rows."""
    rows: list[tuple[str, str]] = []
    for k, v in a.items():
        if k not in in_text:
            implicit = k in VISUAL_ATTRIBUTES and rng.random() < 0.5
            if not implicit:
                rows.append((SPEC_KEYS[k], v))
        elif rng.random() < 0.35:
            rows.append((SPEC_KEYS[k], v))
    for key, values in OTHER_SPECS[fam.group]:
        if rng.random() < 0.6:
            rows.append((key, rng.choice(values)))
    rng.shuffle(rows)
    return rows


def _spans(text: str, value: str) -> list[tuple[int, int]]:
    pattern = re.compile(r"(?<![\w-])" + re.escape(value) + r"(?![\w-])", re.IGNORECASE)
    return [(m.start(), m.end()) for m in pattern.finditer(text)]


def labels_for(title: str, description: str, specs: list[tuple[str, str]], attrs: dict[str, str]) -> list[dict]:
    """Canonical labels: every occurrence of each attribute value; ``field=None`` when only the image shows it."""
    spec_keys = {SPEC_KEYS[k]: k for k in attrs}
    out: list[dict[str, Any]] = []
    for attr, value in attrs.items():
        found: list[dict[str, Any]] = []
        for field, text in (("title", title), ("description", description)):
            for b, e in _spans(text, value):
                found.append({"attribute": attr, "value": value, "field": field, "begin": b, "end": e})
        for key, v in specs:
            if spec_keys.get(key) == attr and v == value:
                found.append({"attribute": attr, "value": value, "field": "specs", "begin": None, "end": None})
        out += found or [{"attribute": attr, "value": value, "field": None, "begin": None, "end": None}]
    return out


def _make_product(i: int, sku: str, fam: Family, rng: random.Random, t0: datetime) -> Product:
    a = _sample_attrs(fam, rng)
    title, in_title = _title(fam, a, rng)
    description, in_desc = _description(a, in_title, rng)
    specs = _specs(fam, a, in_title | in_desc, rng)
    return Product(
        sku=sku,
        family=fam,
        attrs=a,
        title=title,
        description=description,
        specs=specs,
        spec_as_list=rng.random() < 0.15,
        updated_at=_iso(t0 + timedelta(seconds=rng.randint(0, 30 * 86400))),
        vendor_score=round(rng.uniform(2.5, 5.0), 1),
        warehouse_bin=f"{rng.choice('ABCDE')}-{rng.randint(1, 40):02d}-{rng.randint(1, 12):02d}",
        images=[],
        videos=[],
    )


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _perturb_title(p: Product, rng: random.Random) -> str:
    """A near-duplicate's title: one or two of word order, Tee/T-Shirt, a typo, capitalisation, separator."""
    title = p.title
    value_words = {w.lower() for v in p.attrs.values() for w in v.split()}
    edits = rng.sample(("order", "synonym", "typo", "case", "separator"), k=rng.randint(1, 2))
    for edit in edits:
        if edit == "order" and p.attrs["colour"] in title and not title.startswith(p.attrs["colour"]):
            stem = title.replace(" - " + p.attrs["colour"], "").replace(", " + p.attrs["colour"], "")
            stem = stem.replace(" in " + p.attrs["colour"], "")
            title = f"{p.attrs['colour']} {stem}"
        elif edit == "synonym":
            for a, b in (("T-Shirt", "Tee"), ("Sneakers", "Trainers"), ("Coffee Mug", "Mug"), ("Cable", "Cord")):
                if a in title:
                    title = title.replace(a, b)
                    break
            else:
                title = title.replace("Women's", "Womens").replace("Men's", "Mens")
        elif edit == "typo":
            words = title.split(" ")
            cands = [j for j, w in enumerate(words) if len(w) >= 5 and w.isalpha() and w.lower() not in value_words]
            if cands:
                j = rng.choice(cands)
                w = words[j]
                k = rng.randint(1, len(w) - 2)
                words[j] = w[:k] + w[k + 1] + w[k] + w[k + 2 :]
                title = " ".join(words)
        elif edit == "case":
            title = title.lower() if rng.random() < 0.5 else title.upper()
        elif " - " in title:
            title = title.replace(" - ", " | ")
    if title == p.title:  # every edit was a no-op for this title
        title = title.lower()
    return title


# --------------------------------------------------------------------------------------------------------------
# Images: a product silhouette in the product's colour on a clean, slightly shaded background.


@functools.cache
def _light() -> np.ndarray:
    """Light falling from the top left: a (N, N, 1) brightness factor."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE
    return (1.12 - 0.28 * (0.6 * yy + 0.4 * xx))[..., None]


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    """Darker (f < 1) or lighter (f > 1) version of a colour."""
    if f <= 1:
        return tuple(int(c * f) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c + (255 - c) * (f - 1)) for c in rgb)  # type: ignore[return-value]


def _silhouette(fam: Family, a: dict[str, str], d: ImageDraw.ImageDraw) -> None:
    """Draw the product's shape in white on an L mask, in a 256x256 frame."""
    W = 255
    if fam.name == "t_shirt" or fam.name == "dress":
        sleeve = a.get("sleeve_length", "Short Sleeve")
        body_bottom = 215 if fam.name == "t_shirt" else 120
        d.polygon([(88, 62), (168, 62), (172, body_bottom), (84, body_bottom)], fill=W)
        if fam.name == "dress":
            hem = {"Mini": 184, "Midi": 214, "Maxi": 240}[a.get("garment_length", "Midi")]
            d.polygon([(86, 115), (170, 115), (170 + (hem - 115) * 0.45, hem), (86 - (hem - 115) * 0.45, hem)], fill=W)
        d.polygon([(88, 62), (108, 52), (148, 52), (168, 62), (168, 80), (88, 80)], fill=W)  # shoulders
        arm = {"Sleeveless": 0, "Short Sleeve": 38, "3/4 Sleeve": 95, "Long Sleeve": 140}[sleeve]
        if arm:
            for side in (-1, 1):
                x0 = 88 if side < 0 else 168
                x_out = x0 + side * (24 + arm * 0.15)
                y_out = 62 + arm
                width = 30 if arm < 60 else 22
                d.polygon(
                    [(x0, 60), (x0, 60 + 42), (x_out + side * 0, y_out + width * 0.5), (x_out + side * width, y_out)],
                    fill=W,
                )
        else:  # a tank cut: narrow shoulder straps
            d.rectangle((96, 48, 112, 62), fill=W)
            d.rectangle((144, 48, 160, 62), fill=W)
        neck = a.get("neckline", "Crew Neck")
        if neck == "V-Neck":
            d.polygon([(112, 50), (144, 50), (128, 86)], fill=0)
        elif neck == "Scoop Neck":
            d.ellipse((106, 30, 150, 80), fill=0)
        else:
            d.ellipse((112, 38, 144, 66), fill=0)
    elif fam.name == "skirt":
        hem = {"Mini": 150, "Midi": 195, "Maxi": 232}[a.get("garment_length", "Midi")]
        d.rectangle((92, 50, 164, 66), fill=W)  # waistband
        spread = (hem - 66) * 0.42
        d.polygon([(92, 64), (164, 64), (164 + spread, hem), (92 - spread, hem)], fill=W)
    elif fam.group == "shoes":
        heel = int(a.get("heel_height", "2 cm").split()[0])
        lift = heel * 6
        sole_y = 196
        if fam.name == "pump":
            heel_top = sole_y - lift
            d.polygon(
                [(40, heel_top - 34), (66, heel_top - 30), (120, sole_y - lift * 0.55 - 22), (168, sole_y - 34),
                 (206, sole_y - 22), (224, sole_y - 6), (214, sole_y), (160, sole_y - 2),
                 (112, sole_y - lift * 0.5), (58, heel_top), (40, heel_top - 4)],
                fill=W,
            )  # fmt: skip
            d.ellipse((146, sole_y - 46, 228, sole_y + 2), fill=W)  # toe box
            d.polygon([(42, heel_top - 2), (60, heel_top - 2), (56, sole_y), (50, sole_y)], fill=W)  # the heel
        else:
            top = 96 if fam.name == "boot" else 136
            d.polygon(
                [
                    (40, sole_y - lift),
                    (40, top),
                    (96, top - 6),
                    (118, 146),
                    (190, 158),
                    (222, 180),
                    (222, sole_y),
                    (40, sole_y),
                ],
                fill=W,
            )
            d.rectangle((36, sole_y - 4, 226, sole_y + 10), fill=W)  # sole
            d.rectangle((40, sole_y, 72, sole_y + 10 + lift // 3), fill=W)  # heel block
    elif fam.name == "mug":
        d.rounded_rectangle((62, 70, 170, 200), radius=14, fill=W)
        d.ellipse((146, 96, 214, 170), fill=W)
        d.ellipse((162, 112, 198, 154), fill=0)
        d.rectangle((146, 96, 168, 170), fill=W)
    elif fam.name == "bottle":
        d.rounded_rectangle((92, 78, 164, 232), radius=22, fill=W)
        d.polygon([(100, 80), (156, 80), (146, 54), (110, 54)], fill=W)
        d.rounded_rectangle((108, 28, 148, 56), radius=6, fill=W)  # cap
    elif fam.name == "cable":
        pts = [(40 + t * 1.8, 128 + 60 * np.sin(t / 18.0)) for t in range(0, 100)]
        d.line(pts, fill=W, width=9, joint="curve")
        for x, y in (pts[0], pts[-1]):
            d.rounded_rectangle((x - 16, y - 12, x + 16, y + 12), radius=4, fill=W)
    else:  # charger
        d.rounded_rectangle((72, 82, 184, 206), radius=18, fill=W)
        d.rectangle((100, 50, 112, 84), fill=W)
        d.rectangle((144, 50, 156, 84), fill=W)


def _details(fam: Family, a: dict[str, str], d: ImageDraw.ImageDraw) -> None:
    """Parts not in the product colour (soles, laces, metal, ports), on a transparent layer in the mask's frame."""
    if fam.group == "shoes" and fam.name != "pump":
        sole = (238, 236, 230) if fam.name == "sneaker" else (52, 44, 40)
        d.rectangle((36, 192, 226, 206), fill=sole)
    if fam.group == "shoes" and a.get("closure") == "Lace-Up":
        for k in range(4):
            d.line((104 + k * 14, 146 + k * 3, 116 + k * 14, 158 + k * 3), fill=(242, 242, 242), width=3)
    elif fam.group == "shoes" and a.get("closure") == "Buckle":
        y = 150 if fam.name != "pump" else 166
        d.rectangle((118, y, 132, y + 12), outline=(205, 180, 90), width=3)
    elif fam.group == "shoes" and a.get("closure") == "Zip":
        top = 100 if fam.name == "boot" else 142
        d.line((48, top, 48, 188), fill=(190, 190, 196), width=3)
    if fam.name == "charger":
        d.rounded_rectangle((112, 150, 144, 162), radius=3, fill=(25, 25, 25))
        d.rectangle((100, 50, 112, 66), fill=(200, 200, 205))
        d.rectangle((144, 50, 156, 66), fill=(200, 200, 205))
    elif fam.name == "cable":
        for x, y in ((40, 128), (40 + 99 * 1.8, 128 + 60 * np.sin(99 / 18.0))):
            x0 = x - 26 if x < 128 else x + 16  # a metal tip beyond each connector housing
            d.rectangle((x0, y - 6, x0 + 10, y + 6), fill=(200, 200, 205))
    elif fam.name == "bottle":
        d.rounded_rectangle(
            (108, 28, 148, 56), radius=6, fill=(60, 60, 64) if a["colour"] != "Black" else (180, 180, 184)
        )


def _pattern(layer: Image.Image, pattern: str, rgb: tuple[int, int, int], rng: np.random.Generator) -> None:
    d = ImageDraw.Draw(layer)
    if pattern == "Striped":
        ink = _shade(rgb, 0.55) if sum(rgb) > 240 else _shade(rgb, 1.6)
        for y in range(0, IMAGE_SIZE, 18):
            d.rectangle((0, y, IMAGE_SIZE, y + 6), fill=ink)
    elif pattern == "Polka Dot":
        ink = (245, 245, 245) if sum(rgb) < 500 else (40, 40, 40)
        for y in range(8, IMAGE_SIZE, 22):
            for x in range(8 + (y // 22 % 2) * 11, IMAGE_SIZE, 22):
                d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=ink)
    elif pattern == "Floral":
        for _ in range(40):
            x, y = rng.integers(0, IMAGE_SIZE, 2)
            petal = tuple(int(c) for c in rng.integers(120, 255, 3))
            for dx, dy in ((-4, 0), (4, 0), (0, -4), (0, 4)):
                d.ellipse((x + dx - 4, y + dy - 4, x + dx + 4, y + dy + 4), fill=petal)
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(250, 220, 60))


def render_image(fam: Family, attrs: dict[str, str], seed: int, view: int = 0) -> Image.Image:
    """A 256x256 RGB product photo: background gradient, soft shadow, shaded silhouette, brand text, noise.

    ``view`` 1 is a second shot: mirrored, a little closer, on another background.
    """
    rng = np.random.default_rng(seed)
    n = IMAGE_SIZE
    # Background: a near-white vertical gradient with a faint tint.
    tint = rng.integers(-10, 10, 3)
    top, bottom = 250 + tint * 0.3, 222 + tint
    ramp = np.linspace(0.0, 1.0, n)[:, None, None]
    bg = top * (1 - ramp) + bottom * ramp
    img = Image.fromarray(np.clip(np.broadcast_to(bg, (n, n, 3)), 0, 255).astype(np.uint8))

    mask = Image.new("L", (n, n), 0)
    _silhouette(fam, attrs, ImageDraw.Draw(mask))
    parts = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    _details(fam, attrs, ImageDraw.Draw(parts))
    # Small per-image pose jitter; the second view is mirrored and closer.
    angle = float(rng.uniform(-6, 6))
    size = int(n * float(rng.uniform(0.82, 0.92)) * (1.06 if view else 1.0))
    off = ((n - size) // 2 + int(rng.integers(-8, 9)), (n - size) // 2 + int(rng.integers(-6, 7)))

    def pose(im: Image.Image) -> Image.Image:
        im = im.rotate(angle, resample=Image.BILINEAR)
        if view:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        out = Image.new(im.mode, (n, n), 0)
        out.paste(im.resize((size, size), Image.BILINEAR), off)
        return out

    mask, parts = pose(mask), pose(parts)

    # Shadow: the silhouette blurred, offset down-right, darkening the background.
    shadow = mask.filter(ImageFilter.GaussianBlur(7)).point(lambda v: v * 0.35)
    img.paste(Image.new("RGB", (n, n), (60, 60, 66)), (5, 7), shadow)

    # Fill: the colour family (jittered a little), lit from the top left, with the pattern drawn in.
    base = np.array(COLOURS[attrs["colour"]], dtype=np.float32) + rng.normal(0, 6, 3)
    rgb = tuple(int(c) for c in np.clip(base, 0, 255))
    layer = Image.new("RGB", (n, n), rgb)
    _pattern(layer, attrs.get("pattern", "Solid"), rgb, rng)
    arr = np.asarray(layer, dtype=np.float32) * _light()
    layer = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    img.paste(layer, (0, 0), mask.filter(ImageFilter.GaussianBlur(0.8)))
    edge = mask.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.GaussianBlur(0.6))
    img.paste(Image.new("RGB", (n, n), _shade(rgb, 0.6)), (0, 0), edge.point(lambda v: min(255, v * 2)))

    img.paste(parts.convert("RGB"), (0, 0), parts.getchannel("A"))
    d = ImageDraw.Draw(img)
    d.text((10, n - 22), attrs["brand"].upper(), fill=(70, 70, 78), font=_font(13))

    # Sensor noise, so no region is perfectly flat.
    noise = 3.0 * rng.standard_normal((n, n, 1), dtype=np.float32)  # luminance
    noise = noise + 1.5 * rng.standard_normal((n, n, 3), dtype=np.float32)  # chroma
    arr = np.asarray(img, dtype=np.float32) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# Video: a slow zoom and pan over a product image.


def _open_video_stream(container: Any) -> tuple[Any, str]:
    last: Exception | None = None
    for codec in VIDEO_CODECS:
        try:
            stream = container.add_stream(codec, rate=VIDEO_FPS)
        except Exception as exc:  # codec not built into this PyAV/FFmpeg
            last = exc
            continue
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 400_000
        else:
            stream.options = {"crf": "28", "preset": "veryfast", "threads": "1"}
        stream.thread_count = 1
        return stream, codec
    raise RuntimeError(f"No usable video encoder in this PyAV build (tried {', '.join(VIDEO_CODECS)}): {last}")


def write_video(path: Path, image: Image.Image, seed: int) -> str:
    """Encode a 2 s, 10 fps clip zooming into ``image``; returns the codec used."""
    import av

    rng = random.Random(seed)
    zoom_to = rng.uniform(0.7, 0.85)
    cx, cy = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)
    n_frames = VIDEO_FPS * VIDEO_SECONDS
    w, h = image.size
    with av.open(str(path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream, codec = _open_video_stream(container)
        for k in range(n_frames):
            t = k / (n_frames - 1)
            s = 1.0 + (zoom_to - 1.0) * t
            fx, fy = 0.5 + (cx - 0.5) * t, 0.5 + (cy - 0.5) * t
            bw, bh = w * s, h * s
            box = (fx * w - bw / 2, fy * h - bh / 2, fx * w + bw / 2, fy * h + bh / 2)
            box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
            frame = image.resize((VIDEO_SIZE, VIDEO_SIZE), Image.BICUBIC, box=box)
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


# --------------------------------------------------------------------------------------------------------------
# Rows: retailer export format, good and deliberately bad.


def _row(p: Product, labels: list[dict]) -> dict[str, Any]:
    """A product in the retailer export format (keys of ``FIELD_MAP`` plus ``EXTRA_COLUMNS``)."""
    specs: Any = [{"name": k, "value": v} for k, v in p.specs] if p.spec_as_list else dict(p.specs)
    return {
        "sku": p.sku,
        "name": p.title,
        "description": p.description,
        "product_type": p.family.category,
        "attributes": specs,
        "image_urls": p.images,
        "video_urls": p.videos,
        "updated_at": p.updated_at,
        "vendor_score": p.vendor_score,
        "warehouse_bin": p.warehouse_bin,
        "tagged_attributes": labels,
    }


def _dumps(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False, separators=(", ", ": ")).encode("utf-8")


def _product_row(p: Product) -> dict[str, Any]:
    return _row(p, labels_for(p.title, p.description, p.specs, p.attrs))


BAD_KINDS: tuple[str, ...] = (
    "malformed_json",
    "missing_product_id",
    "missing_title",
    "wrong_type_number",
    "wrong_type_list",
    "field_too_long",
    "invalid_utf8",
    "bad_specs",
    "duplicate_in_input",
    "media_not_image",
    "media_unreachable",
    "media_not_video",
    "media_corrupt",
)


def _bad_line(kind: str, p: Product, dup_of: str, media: _MediaWriter) -> tuple[bytes, str | None, str, str]:
    """One deliberately bad line built from product ``p``: (bytes, sku as written, reason code, note)."""
    row = _product_row(p)
    if kind == "malformed_json":
        raw = _dumps(row)
        return raw[: len(raw) * 3 // 5], p.sku, "malformed_json", "JSON object truncated mid-way"
    if kind == "missing_product_id":
        del row["sku"]
        return _dumps(row), None, "missing_product_id", "no sku key"
    if kind == "missing_title":
        row["name"] = ""
        return _dumps(row), p.sku, "missing_title", "name is an empty string"
    if kind == "wrong_type_number":
        row["name"] = 40213
        return _dumps(row), p.sku, "wrong_type", "name is a number"
    if kind == "wrong_type_list":
        row["name"] = p.title.split(" ")
        return _dumps(row), p.sku, "wrong_type", "name is a list of words"
    if kind == "field_too_long":
        word = p.title + " "
        row["name"] = (word * (LONG_TITLE_CHARS // len(word) + 1))[:LONG_TITLE_CHARS].strip()
        return _dumps(row), p.sku, "field_too_long", f"name is {LONG_TITLE_CHARS:,} characters"
    if kind == "invalid_utf8":
        row["description"] = p.description + " Inspired by the café culture of Lisbon."  # spans stay valid
        raw = _dumps(row).replace("café".encode(), "café".encode("latin-1"))  # a Latin-1 byte: b"\xe9"
        return raw, p.sku, "invalid_utf8", "description has a Latin-1 byte 0xE9 (not UTF-8)"
    if kind == "bad_specs":
        row["attributes"] = "; ".join(f"{k}: {v}" for k, v in p.specs) or "Colour: see photo"
        return _dumps(row), p.sku, "bad_specs", "attributes is a plain string"
    if kind == "duplicate_in_input":
        row["sku"] = dup_of
        return _dumps(row), dup_of, "duplicate_in_input", "sku repeats an earlier row with different content"
    if kind == "media_not_image":
        row["image_urls"] = [
            media.text_file("images", f"{p.sku}_front.jpg", b"<html><body>404 Not Found</body></html>\n")
        ]
        return _dumps(row), p.sku, "media_not_image", "image is an HTML text file named .jpg"
    if kind == "media_unreachable":
        row["image_urls"] = [f"images/{p.sku}_missing.jpg"]
        return _dumps(row), p.sku, "media_unreachable", "image path does not exist"
    if kind == "media_not_video":
        row["video_urls"] = [media.text_file("videos", f"{p.sku}.mp4", b"video coming soon\n")]
        return _dumps(row), p.sku, "media_not_video", "video is a text file named .mp4"
    if kind == "media_corrupt":
        good = (media.root / p.images[0]).read_bytes()
        row["image_urls"] = [media.text_file("images", f"{p.sku}_broken.jpg", good[: len(good) // 3])]
        return _dumps(row), p.sku, "media_corrupt", "JPEG truncated to a third of its bytes"
    raise AssertionError(f"unknown bad-row kind {kind}")


class _MediaWriter:
    """Writes images and videos under ``root`` and returns their catalog-relative paths."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.n_images = 0
        self.n_videos = 0
        self.codec = ""
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "videos").mkdir(parents=True, exist_ok=True)

    def images_for(self, p: Product, index: int, n_views: int) -> list[str]:
        paths = []
        for view in range(n_views):
            img = render_image(p.family, p.attrs, seed=_seed(self.seed, index, view), view=view)
            paths.append(self.text_file("images", f"{p.sku}_{view + 1}.jpg", _jpeg(img)))
        return paths

    def relisted_image(self, original: str, sku: str, rng: random.Random) -> str:
        """The original's image, re-encoded at lower quality and maybe slightly resized."""
        img = Image.open(self.root / original).convert("RGB")
        if rng.random() < 0.5:
            side = rng.choice((232, 240, 248))
            img = img.resize((side, side), Image.BICUBIC)
        return self.text_file("images", f"{sku}_1.jpg", _jpeg(img, quality=rng.choice((70, 75, 80))))

    def video_for(self, p: Product, index: int) -> str:
        rel = f"videos/{p.sku}.mp4"
        image = Image.open(self.root / p.images[0]).convert("RGB")
        self.codec = write_video(self.root / rel, image, seed=_seed(self.seed, index, 99))
        self.n_videos += 1
        return rel

    def text_file(self, folder: str, name: str, data: bytes) -> str:
        (self.root / folder / name).write_bytes(data)
        if folder == "images":
            self.n_images += 1
        return f"{folder}/{name}"


def _seed(*parts: int) -> int:
    """A per-item seed from the run seed and item indices, independent of generation order."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------------------
# The generator.


def generate(out_dir: str | Path, n_products: int = 300, seed: int = 0, n_videos: int = 5) -> SampleCatalog:
    """Write a deterministic sample retailer catalog with media, near-duplicates and bad rows under ``out_dir``.

    Args:
        out_dir: Folder to write into (created; files of an earlier run there are overwritten).
        n_products: Good rows in ``catalog.jsonl``, near-duplicate re-listings included. The 13 bad rows come on top.
        seed: Same seed, same ``catalog.jsonl`` bytes.
        n_videos: Products that get a short video.
    """
    if n_products < MIN_PRODUCTS:
        raise ValueError(
            f"n_products={n_products} is too small: use at least {MIN_PRODUCTS} so every bad-row kind fits"
        )
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "videos"):  # stale media of an earlier, larger run would be confusing
        if (root / sub).is_dir():
            shutil.rmtree(root / sub)
    rng = random.Random(seed)
    media = _MediaWriter(root, seed)
    t0 = datetime(2024, 5, 1, tzinfo=UTC) + timedelta(days=seed % 365)

    n_near = max(1, round(0.03 * n_products))
    n_base = n_products - n_near
    n_bad = len(BAD_KINDS)
    numbers = rng.sample(range(10_000, 100_000), n_products + n_bad)
    families = rng.choices(FAMILIES, weights=FAMILY_WEIGHTS, k=n_base + n_bad)

    def new_product(i: int, fam: Family) -> Product:
        return _make_product(i, f"{fam.code}-{numbers[i]:05d}", fam, rng, t0)

    # Good products with one or two images each, a few with a video.
    base = [new_product(i, families[i]) for i in range(n_base)]
    for i, p in enumerate(base):
        p.images = media.images_for(p, i, n_views=2 if rng.random() < 0.4 else 1)
    for i in sorted(rng.sample(range(n_base), min(n_videos, n_base))):
        base[i].videos = [media.video_for(base[i], i)]

    # Near-duplicates: the same product re-listed under another sku with a slightly different title.
    near: list[Product] = []
    truth: list[tuple[str, str]] = []
    for j, i in enumerate(sorted(rng.sample(range(n_base), n_near))):
        o = base[i]
        fam = o.family
        sku = f"{fam.code}-{numbers[n_base + n_bad + j]:05d}"
        sentences = o.description.split(". ")
        description = ". ".join(sentences[:-1]) + "." if len(sentences) > 1 and rng.random() < 0.3 else o.description
        dup = Product(
            sku=sku,
            family=fam,
            attrs=dict(o.attrs),
            title=_perturb_title(o, rng),
            description=description,
            specs=list(o.specs),
            spec_as_list=o.spec_as_list,
            updated_at=_iso(t0 + timedelta(seconds=rng.randint(0, 30 * 86400))),
            vendor_score=round(rng.uniform(2.5, 5.0), 1),
            warehouse_bin=f"{rng.choice('ABCDE')}-{rng.randint(1, 40):02d}-{rng.randint(1, 12):02d}",
            images=[media.relisted_image(o.images[0], sku, rng)],
            videos=[],
        )
        near.append(dup)
        truth.append((o.sku, sku))

    good = base + near
    rng.shuffle(good)
    good_lines = [_dumps(_product_row(p)) for p in good]

    # Bad rows, evenly spread so that good rows surround each one; kinds in a seeded order.
    kinds = list(BAD_KINDS)
    rng.shuffle(kinds)
    total = len(good_lines) + n_bad
    positions = [round((k + 1) * total / (n_bad + 1)) for k in range(n_bad)]  # 0-based line indices
    lines: list[bytes] = []
    bad_rows: list[dict[str, Any]] = []
    g = 0
    for k, kind in enumerate(kinds):
        while len(lines) < positions[k]:
            lines.append(good_lines[g])
            g += 1
        i = n_base + k
        p = new_product(i, families[i])
        p.images = media.images_for(p, i, n_views=1)
        dup_of = good[rng.randrange(g)].sku
        raw, sku, reason, note = _bad_line(kind, p, dup_of, media)
        lines.append(raw)
        bad_rows.append({"line": len(lines), "sku": sku, "expected_reason": reason, "note": note})
    lines += good_lines[g:]
    assert len(lines) == total and b"\n" not in b"".join(lines)

    catalog_path = root / "catalog.jsonl"
    catalog_path.write_bytes(b"\n".join(lines) + b"\n")
    (root / "bad_rows.json").write_text(json.dumps(bad_rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(root / "duplicates_truth.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("sku_a", "sku_b"))
        w.writerows(truth)
    csv_bad = _write_csv(root / "catalog.csv", [_product_row(p) for p in good])
    (root / "bad_rows_csv.json").write_text(json.dumps(csv_bad, indent=1) + "\n", encoding="utf-8")

    return SampleCatalog(
        root=root,
        catalog_path=catalog_path,
        csv_path=root / "catalog.csv",
        images_dir=root / "images",
        videos_dir=root / "videos",
        bad_rows_path=root / "bad_rows.json",
        csv_bad_rows_path=root / "bad_rows_csv.json",
        duplicates_truth_path=root / "duplicates_truth.csv",
        n_rows=total,
        n_good_rows=len(good_lines),
        n_bad_rows=n_bad,
        n_near_duplicates=n_near,
        n_images=media.n_images,
        n_videos=media.n_videos,
        video_codec=media.codec,
    )


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The good rows as a CSV export, plus one row with too few columns; returns its bad-row record."""
    bad_at = len(rows) // 2
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for k, row in enumerate(rows):
            if k == bad_at:
                w.writerow(("CSV-00000", "Kestrel Unisex Cotton Tee - Grey", "A row that lost its other columns."))
            w.writerow(
                [json.dumps(row[c], ensure_ascii=False) if c in CSV_JSON_COLUMNS else row[c] for c in CSV_COLUMNS]
            )
    note = f"3 columns instead of {len(CSV_COLUMNS)}"
    return [{"line": bad_at + 2, "sku": "CSV-00000", "expected_reason": "malformed_csv", "note": note}]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n-products", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-videos", type=int, default=5)
    args = parser.parse_args(argv)
    cat = generate(args.out_dir, n_products=args.n_products, seed=args.seed, n_videos=args.n_videos)
    print(cat)


if __name__ == "__main__":
    main()
