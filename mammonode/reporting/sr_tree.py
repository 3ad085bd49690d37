"""SR content items as a small typed tree on pydicom, for templates no library builds.

Each :class:`Item` kind writes its own value attributes; :class:`Reference` is a by-reference
relationship (Referenced Content Item Identifier) to an item elsewhere in the tree, resolved
when the tree is encoded, so no item is ever copied to be referred to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.valuerep import DSfloat

CONTAINS = "CONTAINS"
HAS_PROPERTIES = "HAS PROPERTIES"
HAS_CONCEPT_MOD = "HAS CONCEPT MOD"
HAS_ACQ_CONTEXT = "HAS ACQ CONTEXT"
INFERRED_FROM = "INFERRED FROM"
SELECTED_FROM = "SELECTED FROM"


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    if code.scheme_version:
        item.CodingSchemeVersion = code.scheme_version
    item.CodeMeaning = code.meaning
    return item


@dataclass(eq=False, kw_only=True)
class Item:
    """A content item; ``rel`` is its relationship to its parent ("" for the root)."""

    value_type: ClassVar[str]
    rel: str
    name: Code | None = None
    children: list[Item] = field(default_factory=list)

    def _value(self, ds: Dataset) -> None:
        """Write this kind's value attributes."""


@dataclass(eq=False, kw_only=True)
class Container(Item):
    value_type: ClassVar[str] = "CONTAINER"

    def _value(self, ds: Dataset) -> None:
        ds.ContinuityOfContent = "SEPARATE"


@dataclass(eq=False, kw_only=True)
class CodeItem(Item):
    value_type: ClassVar[str] = "CODE"
    value: Code

    def _value(self, ds: Dataset) -> None:
        ds.ConceptCodeSequence = [_code(self.value)]


@dataclass(eq=False, kw_only=True)
class NumItem(Item):
    value_type: ClassVar[str] = "NUM"
    value: float
    unit: Code

    def _value(self, ds: Dataset) -> None:
        measured = Dataset()
        value = float(self.value)
        measured.NumericValue = str(int(value)) if value.is_integer() else DSfloat(value, auto_format=True)
        measured.MeasurementUnitsCodeSequence = [_code(self.unit)]
        ds.MeasuredValueSequence = [measured]


@dataclass(eq=False, kw_only=True)
class TextItem(Item):
    value_type: ClassVar[str] = "TEXT"
    value: str

    def _value(self, ds: Dataset) -> None:
        ds.TextValue = self.value


@dataclass(eq=False, kw_only=True)
class DateItem(Item):
    value_type: ClassVar[str] = "DATE"
    value: str

    def _value(self, ds: Dataset) -> None:
        ds.Date = self.value


@dataclass(eq=False, kw_only=True)
class TimeItem(Item):
    value_type: ClassVar[str] = "TIME"
    value: str

    def _value(self, ds: Dataset) -> None:
        ds.Time = self.value


@dataclass(eq=False, kw_only=True)
class ImageItem(Item):
    value_type: ClassVar[str] = "IMAGE"
    sop_class_uid: str
    sop_instance_uid: str

    def _value(self, ds: Dataset) -> None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = self.sop_class_uid
        ref.ReferencedSOPInstanceUID = self.sop_instance_uid
        ds.ReferencedSOPSequence = [ref]


@dataclass(eq=False, kw_only=True)
class ScoordItem(Item):
    """Image coordinates: (column, row) pairs, (0, 0) the top left corner of the top left pixel."""

    value_type: ClassVar[str] = "SCOORD"
    graphic_type: str  # POINT or POLYLINE
    points: list[tuple[float, float]]

    def _value(self, ds: Dataset) -> None:
        ds.GraphicType = self.graphic_type
        ds.GraphicData = [float(v) for point in self.points for v in point]


@dataclass(eq=False)
class Reference:
    """A by-reference relationship to an item elsewhere in the tree (e.g. an Image Library
    entry), encoded as its Referenced Content Item Identifier, never a copy."""

    rel: str
    target: Item


Node = Item | Reference


def encode(root: Container, template: str) -> Dataset:
    """The root item's attributes (to merge into the document) with its whole tree."""
    paths: dict[int, list[int]] = {}

    def number(item: Item, path: list[int]) -> None:
        paths[id(item)] = path
        for index, child in enumerate(item.children, start=1):
            if isinstance(child, Item):
                number(child, [*path, index])

    def build(node: Node) -> Dataset:
        ds = Dataset()
        if node.rel:
            ds.RelationshipType = node.rel
        if isinstance(node, Reference):
            ds.ReferencedContentItemIdentifier = paths[id(node.target)]
            return ds
        ds.ValueType = node.value_type
        if node.name is not None:
            ds.ConceptNameCodeSequence = [_code(node.name)]
        node._value(ds)
        if node.children:
            ds.ContentSequence = [build(child) for child in node.children]
        return ds

    number(root, [1])
    ds = build(root)
    mapping = Dataset()
    mapping.MappingResource = "DCMR"
    mapping.TemplateIdentifier = template
    ds.ContentTemplateSequence = [mapping]
    return ds
