"""Primitives of the shapes world: shapes, colors, sizes, the grid, scenes, plan text, and the word splitter.

A scene is a tuple of objects, each a (shape, color, size) drawn centred in one cell of a ``GRID x GRID`` grid
(``x`` the column, 0 = left; ``y`` the row, 0 = top). Objects sit in distinct cells and never reach beyond their
cell, so they never overlap. The plan text is the scene written out as a reasoning model would write its layout
first: ``"large red circle at x1y2; small blue square at x0y0"``. The cell is one word (column and row together), so a
model binds an object to a cell with a single lookup instead of a column-and-row conjunction.

Chosen not to do: free (sub-cell) positions, rotations, overlapping objects. They would make the world harder to
learn for a tiny model and the truth harder to read from pixels, and the recipe does not need them.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Union

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                           "diamond": "diamonds", "cross": "crosses"}
# Well separated in hue as seen from the black background: the verifier classifies a pixel by the line from the
# background to each color, so a blurred (darker) edge of one color is never read as another (no gray, no brown).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 20, 20),
    "orange": (255, 125, 0),
    "yellow": (235, 230, 0),
    "green": (20, 190, 40),
    "blue": (40, 90, 255),
    "purple": (150, 40, 235),
    "pink": (255, 105, 200),
    "white": (240, 240, 240),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
BACKGROUND_NAME = "black"
SIZES: tuple[str, ...] = ("small", "large")
# Bounding-box span of a shape as a fraction of the cell side (32 px image: cell 10.7 px, small 6.4, large 9.6).
SIZE_FRACTION: dict[str, float] = {"small": 0.6, "large": 0.9}
GRID = 3
MAX_OBJECTS = 5
DEFAULT_RESOLUTION = 32
NUMBER_WORDS: tuple[str, ...] = ("no", "one", "two", "three", "four", "five")
ROW_WORDS: tuple[str, ...] = ("top", "middle", "bottom")
COL_WORDS: tuple[str, ...] = ("left", "middle", "right")
EMPTY_PLAN = "empty"


@dataclass(frozen=True)
class ShapeObject:
    """One object: ``shape`` in SHAPES, ``color`` in COLORS, ``size`` in SIZES, cell ``(x, y)`` in ``[0, GRID)``."""
    shape: str
    color: str
    size: str
    x: int
    y: int

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; use one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; use one of {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; use one of {SIZES}")
        for name in ("x", "y"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < GRID:
                raise ValueError(f"{name} must be an integer cell in [0, {GRID}), got {v!r}")

    def words(self) -> str:
        return f"{self.size} {self.color} {self.shape} at x{self.x}y{self.y}"


@dataclass(frozen=True)
class Scene:
    """A list of objects in distinct cells (at most ``GRID * GRID``). An empty scene is allowed: it renders as a
    plain background and its plan text is ``"empty"``."""
    objects: tuple[ShapeObject, ...] = ()

    def __post_init__(self):
        objs = tuple(self.objects)
        object.__setattr__(self, "objects", objs)
        for i, o in enumerate(objs):
            if not isinstance(o, ShapeObject):
                raise ValueError(f"Scene.objects[{i}] must be a ShapeObject, got {type(o).__name__}")
        cells = [(o.x, o.y) for o in objs]
        if len(set(cells)) != len(cells):
            dup = sorted({c for c in cells if cells.count(c) > 1})
            raise ValueError(f"objects must occupy distinct cells; cells {dup} are used twice")

    def __len__(self) -> int:
        return len(self.objects)

    def __iter__(self) -> Iterator[ShapeObject]:
        return iter(self.objects)

    def to_json(self) -> dict:
        """A JSON-able dict ``{"objects": [{"shape", "color", "size", "x", "y"}, ...]}`` (use ``json.dumps`` on it)."""
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_json(cls, data: Union[str, Mapping[str, Any]]) -> "Scene":
        """Inverse of ``to_json``; also accepts the JSON string. Raises ``ValueError`` on a malformed scene."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise ValueError(f"scene is not valid JSON: {e}") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("objects"), list):
            raise ValueError('a scene must be {"objects": [{"shape", "color", "size", "x", "y"}, ...]}')
        objs = []
        for i, o in enumerate(data["objects"]):
            if not isinstance(o, Mapping) or set(o) != {"shape", "color", "size", "x", "y"}:
                raise ValueError(f"scene object {i} must have exactly the keys shape, color, size, x, y; got {o!r}")
            objs.append(ShapeObject(**o))
        return cls(tuple(objs))


_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """The canonical word splitter: lowercase, runs of letters/digits are words, every other non-space character
    (``;``, ``,``, ``?``, ``.``) is a token of its own.
    ``"Is there a red circle?" -> ["is", "there", "a", "red", "circle", "?"]``."""
    if not isinstance(text, str):
        raise TypeError(f"words() needs a string, got {type(text).__name__}")
    return _TOKEN.findall(text.lower())


def plan_text(scene: Scene) -> str:
    """The explicit layout, one item per object in scene order: ``"<size> <color> <shape> at x<col>y<row>"``
    joined by ``"; "``; ``"empty"`` for an empty scene."""
    if not isinstance(scene, Scene):
        raise TypeError(f"plan_text() needs a Scene, got {type(scene).__name__}")
    if not scene.objects:
        return EMPTY_PLAN
    return "; ".join(o.words() for o in scene.objects)


_CELL = re.compile(r"^x(\d+)y(\d+)$")


def parse_plan(text: str) -> Scene:
    """Inverse of ``plan_text`` (case and spacing do not matter). Raises ``ValueError`` saying which item is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"a plan must be a string, got {type(text).__name__}")
    toks = words(text)
    if toks == [EMPTY_PLAN]:
        return Scene(())
    if not toks:
        raise ValueError('empty plan text; write "empty" for a scene without objects')
    items: list[list[str]] = [[]]
    for t in toks:
        if t == ";":
            items.append([])
        else:
            items[-1].append(t)
    objs = []
    for i, it in enumerate(items):
        form = "'<size> <color> <shape> at x<col>y<row>'"
        if len(it) != 5 or it[3] != "at":
            raise ValueError(f"cannot parse plan item {i + 1} {' '.join(it)!r}: expected {form}")
        size, color, shape, _, cell = it
        m = _CELL.match(cell)
        if not m:
            raise ValueError(f"cannot parse plan item {i + 1} {' '.join(it)!r}: expected {form}")
        try:
            objs.append(ShapeObject(shape, color, size, int(m.group(1)), int(m.group(2))))
        except ValueError as e:
            raise ValueError(f"plan item {i + 1} {' '.join(it)!r}: {e}") from None
    try:
        return Scene(tuple(objs))
    except ValueError as e:
        raise ValueError(f"plan {text!r}: {e}") from None


def cell_tokens() -> list[str]:
    """The plan's cell words ``x<col>y<row>``, one per cell (``GRID * GRID`` of them)."""
    return [f"x{c}y{r}" for r in range(GRID) for c in range(GRID)]

