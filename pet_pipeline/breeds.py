"""The 37 Oxford-IIIT Pet breeds in official order (CLASS-ID 1..37), with their species."""

from __future__ import annotations

from pet_pipeline.errors import UserError

# Official CLASS-ID order: names sorted case-insensitively. Cats are capitalised.
BREEDS = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
    "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees",
    "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon", "miniature_pinscher",
    "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue", "saint_bernard",
    "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx",
    "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)
SPECIES_NAMES = ("cat", "dog")  # official SPECIES 1 = cat, 2 = dog
CAT_BREEDS = tuple(b for b in BREEDS if b[0].isupper())
DOG_BREEDS = tuple(b for b in BREEDS if b[0].islower())

_BY_LOWER = {b.lower(): b for b in BREEDS}


def species_of(breed: str) -> str:
    return "cat" if breed in CAT_BREEDS else "dog"


def official_name(name: str) -> str | None:
    """`'maine_coon'`, `'Maine Coon'` or `'MAINE_COON'` -> `'Maine_Coon'`; None if unknown."""
    return _BY_LOWER.get(name.strip().lower().replace(" ", "_").replace("-", "_"))


def kept_breeds(species: str, breeds: list[str] | None = None) -> list[str]:
    """The breeds a run trains on, in official order.

    `species` picks cat, dog or all; an explicit `breeds` list narrows that down further.
    """
    pool = {"cat": CAT_BREEDS, "dog": DOG_BREEDS, "all": BREEDS}[species]
    if breeds is None:
        return list(pool)
    wanted = set()
    for name in breeds:
        official = official_name(name)
        if official is None:
            import difflib

            close = difflib.get_close_matches(name.lower(), list(_BY_LOWER), n=1)
            hint = f"; did you mean {_BY_LOWER[close[0]]!r}?" if close else "."
            raise UserError(f"breeds: {name!r} is not an Oxford-IIIT Pet breed{hint}")
        if official not in pool:
            raise UserError(
                f"breeds: {official} is a {species_of(official)}, but species is {species!r}; "
                "set species to all or drop it from breeds."
            )
        wanted.add(official)
    return [b for b in pool if b in wanted]
