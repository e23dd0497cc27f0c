"""Grammar building and bitmasks (constraints.py) and their use in sampling."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from support.engine_harness import demo_model

from server.engine.sample.constraints import Constraints, _closed
from server.engine.sample.logits_processors import token_masks
from server.engine.sample.sampling import SamplerState, sample
from server.engine.types import InvalidRequest, OutputConstraint, SamplingParams, ToolSpec

V = demo_model()[0].args.vocab_size  # the demo model's vocabulary


@pytest.fixture(scope="module")
def cons():
    return Constraints(demo_model()[1], V, {2})


def allowed(masks: np.ndarray, row: int) -> set[int]:
    bits = np.unpackbits(masks[row].view(np.uint8), bitorder="little")[:V]
    return set(np.flatnonzero(bits).tolist())


def test_free_request_has_no_constraint(cons):
    assert cons.build(None) is None
    assert cons.build(OutputConstraint()) is None
    assert cons.build(OutputConstraint(tools=(ToolSpec("f"),))) is None  # auto: free


def test_invalid_schema_carries_llguidance_message(cons):
    with pytest.raises(InvalidRequest, match="Pointer '/nope' does not exist"):
        cons.build(OutputConstraint(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nope"}}}))
    with pytest.raises(InvalidRequest, match="needs at least one tool"):
        cons.build(OutputConstraint(tool_choice="required"))


def test_masks_follow_the_grammar_and_eos_only_at_the_end(cons):
    tok = demo_model()[1]
    c = cons.build(
        OutputConstraint(
            json_schema={
                "type": "object",
                "properties": {"a": {"const": 1}},
                "required": ["a"],
                "additionalProperties": False,
            }
        )
    )
    masks = cons.fill_masks([None, c])
    assert len(allowed(masks, 0)) == V
    first = allowed(masks, 1)
    assert 2 not in first and all(tok.decode([t]).startswith("{") for t in first)
    for t in tok.encode('{"a": 1}', add_special_tokens=False):
        assert t in allowed(cons.fill_masks([c]), 0)
        c.consume(t)
    assert c.done or allowed(cons.fill_masks([c]), 0) == {2}


def test_tool_choice_none_bans_the_start_token(cons):
    c = cons.build(OutputConstraint(tools=(ToolSpec("f"),), tool_choice="none"))
    start = cons.syntax.start_id
    assert allowed(cons.fill_masks([c]), 0) == set(range(V)) - {start}


def test_token_masks_and_sample():
    masks = np.zeros((2, V // 32), dtype=np.int32)
    masks[0, 0] = 1 << 5  # only token 5
    masks[1, :] = -1
    logits = mx.zeros((2, V))
    out = token_masks(mx.array(masks))(logits)
    assert mx.isinf(out[0]).sum().item() == V - 1 and out[0, 5].item() == 0 and not mx.isinf(out[1]).any().item()
    states = [SamplerState(SamplingParams(temperature=1.0, seed=1), [], V) for _ in range(2)]
    assert sample(logits, states, [token_masks(mx.array(masks))]).tokens.tolist()[0] == 5


def test_an_object_that_lists_its_properties_admits_no_others_unless_it_says_so():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}},
        "items": [{"properties": {"c": {}}}],
        "$defs": {"open": {"properties": {"d": {}}, "additionalProperties": True}},
    }
    closed = _closed(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False  # nested
    assert closed["items"][0]["additionalProperties"] is False  # inside lists
    assert closed["$defs"]["open"]["additionalProperties"] is True  # an explicit choice is kept
    assert _closed({"type": "object"}) == {"type": "object"}  # json_object: any keys
    assert "additionalProperties" not in schema  # the client's schema is not changed
