"""Each pass declares what it requires and provides; the driver checks the order and the result."""

from __future__ import annotations

import pytest

import compiler
from compiler.passes import CHECKS, TRANSFORMS_AFTER_CHECKS, TRANSFORMS_BEFORE_CHECKS, plan
from compiler.passes.contract import PassOrderError, check_order, contract, contract_of, verify
from compiler.passes.sample_variations import sample_variations

PIPELINE = (*TRANSFORMS_BEFORE_CHECKS, *CHECKS, *TRANSFORMS_AFTER_CHECKS)


def test_every_pass_declares_a_contract_and_the_shipped_order_satisfies_them():
    for function in PIPELINE:
        assert contract_of(function) is not None
    check_order(PIPELINE)


def test_planning_before_the_layers_are_drawn_is_refused_by_name():
    reordered = [f for f in PIPELINE if f is not sample_variations]
    with pytest.raises(PassOrderError, match="pass `plan` requires nodes.layer_settings"):
        check_order(reordered)


def test_a_transform_that_does_not_write_what_it_declares_is_caught(write_spec):
    @contract(provides=("nodes.velocity",))
    def forgetful(ir):
        return ir

    ir = compiler.build_ir(compiler.load_spec(write_spec(SPEC)))
    with pytest.raises(PassOrderError, match="did not provide nodes.velocity"):
        verify(forgetful(ir), forgetful)


def test_analyze_verifies_each_transform(write_spec):
    ir = compiler.analyze(write_spec(SPEC))
    verify(ir, plan)  # what plan provides is present on the analysed IR


SPEC = """
spec: 1
name: tiny
inputs:
  tokens: {kind: tokens, vocab: 40, context: 16}
nodes:
  body: {kind: transformer, width: 16, heads: 2, layers: 1}
outputs:
  logits: {from: body, kind: lm_head}
"""


def test_a_contract_must_name_records_the_ir_has():
    with pytest.raises(PassOrderError, match="`facts.bus_widht` names no IR record"):
        contract(requires=("facts.bus_widht",))


def test_facts_are_a_typed_record_filled_in_by_the_passes(write_spec):
    facts = compiler.analyze(write_spec(SPEC)).facts
    assert facts.bus_width == 16 and facts.context == 16
    assert facts.address == {"body": (0, 0)} and facts.parameters > 0


def test_vertex_and_edge_records_refuse_fields_they_do_not_declare(write_spec):
    ir = compiler.analyze(write_spec(SPEC))
    body = ir.graph.nodes["nodes.body"]
    assert body.width == body["width"] == 16  # a declared field, by name or attribute
    with pytest.raises(KeyError, match="VertexRecord has no field `widht`"):
        body["widht"] = 16
    with pytest.raises(KeyError, match="has no field `velocity_`"):
        body.get("velocity_", 1)  # no silent default for a field that does not exist
    edge = next(iter(ir.graph.edges(data=True)))[2]
    with pytest.raises(KeyError, match="EdgeRecord has no field `weight`"):
        edge["weight"] = 1.0


def test_a_kind_declares_the_vertex_fields_its_passes_write():
    from compiler.ir import VertexRecord

    assert "velocity" in VertexRecord().fields()  # the gear kind's


def test_a_record_field_refuses_a_value_of_the_wrong_type(write_spec):
    ir = compiler.analyze(write_spec(SPEC))
    with pytest.raises(TypeError, match="VertexRecord.width holds int or NoneType, not str"):
        ir.graph.nodes["nodes.body"]["width"] = "16"
