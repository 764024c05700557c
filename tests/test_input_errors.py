"""`sketchwalk.input_errors.first_error`: the one translator of pydantic errors the sweep file, the
ablation plan and the suite file share (their own wordings are tested with them)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sketchwalk.input_errors import first_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Inner(_Strict):
    low: int
    high: int = 1

    @model_validator(mode="after")
    def _order(self):
        if self.high < self.low:
            raise ValueError("high must be >= low")
        return self


class Cat(_Strict):
    type: Literal["cat"]
    values: list[int]


class Num(_Strict):
    type: Literal["num"]
    low: float


Kind = Annotated[Union[Cat, Num], Field(discriminator="type")]


class Root(_Strict):
    name: str
    inner: Inner = Field(default_factory=lambda: Inner(low=0))
    items: list[Inner] = Field(default_factory=list)
    lengths: tuple[int, ...] = ()
    kinds: dict[str, Kind] = Field(default_factory=dict)
    maybe: Optional[Inner] = None
    mode: Union[Literal["auto"], float] = "auto"
    source: Optional[str] = None  # set by a loader, never by the user

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v == "bad":
            raise ValueError(f"name {v!r} is reserved")
        return v


ROOT_KEYS = "['name', 'inner', 'items', 'lengths', 'kinds', 'maybe', 'mode']"


def _first(data, **kw):
    with pytest.raises(ValidationError) as err:
        Root.model_validate(data)
    return first_error(err.value, Root, **kw)


@pytest.mark.parametrize("data, field, message", [
    # An unknown key comes first, even after a missing field, and lists the keys of its own model.
    ({"nme": "x"}, "nme", f"unknown key; allowed keys here: {ROOT_KEYS} (got 'x')"),
    ({"name": "x", "inner": {"low": 1, "hi": 2}}, "inner.hi", "unknown key; allowed keys here: ['low', 'high'] (got 2)"),
    ({"name": "x", "items": [{"low": 1}, {"lo": 1}]}, "items.1.lo", "unknown key; allowed keys here: ['low', 'high'] (got 1)"),
    ({"name": "x", "maybe": {"x": 1}}, "maybe.x", "unknown key; allowed keys here: ['low', 'high'] (got 1)"),
    # Through a dict's values and a tagged union: the tag picks the model, and is not in the path.
    ({"name": "x", "kinds": {"k": {"type": "num", "low": 1, "step": 2}}}, "kinds.k.step",
     "unknown key; allowed keys here: ['type', 'low'] (got 2)"),
    ({"name": "x", "kinds": {"k": {"type": "cat", "values": [1, "a"]}}}, "kinds.k.values.1",
     "Input should be a valid integer, unable to parse string as an integer (got 'a')"),
    ({"name": "x", "kinds": {"k": {"low": 1}}}, "kinds.k",
     "Unable to extract tag using discriminator 'type'; expected tags: 'cat', 'num'"),
    ({"name": "x", "kinds": {"k": {"type": "dog"}}}, "kinds.k",
     "Input tag 'dog' found using 'type' does not match any of the expected tags: 'cat', 'num'"),
    # A missing field has no value to show; a value error loses pydantic's prefix; a quoted value is not repeated.
    ({}, "name", "Field required"),
    ({"name": "x", "inner": {}}, "inner.low", "Field required"),
    ({"name": "bad"}, "name", "name 'bad' is reserved"),
    ({"name": "x", "inner": {"low": "two"}}, "inner.low",
     "Input should be a valid integer, unable to parse string as an integer (got 'two')"),
    # A check of a whole model would print the whole mapping: no value.
    ({"name": "x", "inner": {"low": 3, "high": 1}}, "inner", "high must be >= low"),
    ({"name": "x", "inner": 5}, "inner", "Input should be a valid dictionary or instance of Inner (got 5)"),
    # A tuple field is a list in YAML; a plain union's member label is not in the path.
    ({"name": "x", "lengths": 3}, "lengths", "Input should be a valid list (got 3)"),
    ({"name": "x", "mode": "manual"}, "mode", "Input should be 'auto' (got 'manual')"),
])
def test_first_error(data, field, message):
    assert _first(data, hidden=("source",)) == (field, message)


def test_hidden_keys_are_not_offered():
    field, message = _first({"name": "x", "sourc": 1}, hidden=("source",))
    assert field == "sourc" and "'source'" not in message
    assert "'source'" in _first({"name": "x", "sourc": 1})[1]


def test_whole_document_error_has_an_empty_path():
    class Pair(_Strict):
        a: int = 0
        b: int = 0

        @model_validator(mode="after")
        def _one(self):
            if self.a and self.b:
                raise ValueError("set a or b, not both")
            return self

    with pytest.raises(ValidationError) as err:
        Pair.model_validate({"a": 1, "b": 1})
    assert first_error(err.value, Pair) == ("", "set a or b, not both")
