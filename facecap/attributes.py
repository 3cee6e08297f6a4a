"""The 40 CelebA attributes: names, order, the paper's five categories, contradiction rules.

The one table every stage, the caption grammar, the quality suites and the
report read. Names and order are CelebA's (``list_attr_celeba.txt``); an
attribute's index here is its index in every ``attribute_probs`` vector.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
assert len(ATTRIBUTES) == 40
INDEX: dict[str, int] = {name: i for i, name in enumerate(ATTRIBUTES)}

# FaceCaption-15M, Fig. 4a: the five categories and their share of kept labels (%).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "facial characteristics": (
        "Arched_Eyebrows", "Bags_Under_Eyes", "Big_Lips", "Big_Nose", "Bushy_Eyebrows", "Chubby", "Double_Chin",
        "High_Cheekbones", "Mouth_Slightly_Open", "Narrow_Eyes", "Oval_Face", "Pale_Skin", "Pointy_Nose",
        "Rosy_Cheeks", "Smiling", "Heavy_Makeup",
    ),
    "elementary traits": ("Attractive", "Blurry", "Male", "Young"),
    "beard": ("5_o_Clock_Shadow", "Goatee", "Mustache", "No_Beard", "Sideburns"),
    "hair": (
        "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "Receding_Hairline",
        "Straight_Hair", "Wavy_Hair",
    ),
    "accessories": (
        "Eyeglasses", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie",
    ),
}
PAPER_CATEGORY_SHARES: dict[str, float] = {
    "facial characteristics": 33.9,
    "elementary traits": 26.7,
    "beard": 14.9,
    "hair": 13.9,
    "accessories": 10.6,
}
CATEGORY_OF: dict[str, str] = {name: cat for cat, names in CATEGORIES.items() for name in names}
assert sorted(CATEGORY_OF) == sorted(ATTRIBUTES), "every attribute belongs to exactly one category"

HAIR_COLOURS = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")
FACIAL_HAIR = ("Goatee", "Mustache", "5_o_Clock_Shadow", "Sideburns")


@dataclass(frozen=True)
class Contradiction:
    """Two groups of attributes that cannot both be present on one face.

    When kept attributes from both sides occur, the side holding the single
    most probable attribute wins and the other side's attributes are dropped.
    """

    name: str
    left: tuple[str, ...]
    right: tuple[str, ...]


# The one place contradiction rules live. The annotate stage applies them,
# the caption check and the quality suites use them to spot contradictions.
CONTRADICTIONS: tuple[Contradiction, ...] = (
    Contradiction("bald_vs_bangs", ("Bald",), ("Bangs",)),
    Contradiction("bald_vs_hair_colour", ("Bald",), HAIR_COLOURS),
    Contradiction("bald_vs_hair_texture", ("Bald",), ("Straight_Hair", "Wavy_Hair")),
    Contradiction("no_beard_vs_facial_hair", ("No_Beard",), FACIAL_HAIR),
    Contradiction("straight_vs_wavy", ("Straight_Hair",), ("Wavy_Hair",)),
    Contradiction("black_vs_blond", ("Black_Hair",), ("Blond_Hair",)),
    Contradiction("black_vs_brown", ("Black_Hair",), ("Brown_Hair",)),
    Contradiction("black_vs_gray", ("Black_Hair",), ("Gray_Hair",)),
    Contradiction("blond_vs_brown", ("Blond_Hair",), ("Brown_Hair",)),
    Contradiction("blond_vs_gray", ("Blond_Hair",), ("Gray_Hair",)),
    Contradiction("brown_vs_gray", ("Brown_Hair",), ("Gray_Hair",)),
)


def contradicting(name: str) -> set[str]:
    """Attributes that cannot be present together with `name`."""
    out: set[str] = set()
    for rule in CONTRADICTIONS:
        if name in rule.left:
            out.update(rule.right)
        if name in rule.right:
            out.update(rule.left)
    return out
