"""Every name a spec uses must name something: edge endpoints, node inputs, output sources."""

from __future__ import annotations

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic, did_you_mean
from compiler.passes.contract import contract


@contract(requires=(), provides=())
def check_references(ir: IR) -> list[Diagnostic]:
    spec = ir.spec
    found: list[Diagnostic] = []
    for vertex, data in ir.vertices("unknown"):
        section = vertex.split(".", 1)[0]
        if ir.withheld.may_name(section, data["name"]):
            continue  # it may name what is written but failed validation: reported there
        declared = {"inputs": spec.inputs, "outputs": spec.outputs}.get(section, spec.nodes)
        known = ir.withheld.names(section, declared)
        what = {"inputs": "input", "outputs": "output"}.get(section, "node")
        guess = did_you_mean(data["name"], known)
        hint = (
            f"did you mean `{guess}`?" if guess else f"the spec's {what}s are: {', '.join(known)}"
        )
        paths = [d["path"] for _, _, d in ir.graph.out_edges(vertex, data=True)]
        paths += [d["path"] for _, _, d in ir.graph.in_edges(vertex, data=True)]
        for path in sorted(set(paths), key=str):
            # point at the field that holds the name: `from`/`to` of an edge, an input or source entry
            target = path
            if path[0] == "edges":
                edge = spec.edges[path[1]]
                sent = edge.source if section != "outputs" else edge.source.split(".", 1)[1]
                target = (*path, "from") if sent == data["name"] else (*path, "to")
            found.append(ir.error(target, f"no {what} named `{data['name']}`", hint))
    if "self" in spec.inputs:  # `model(self=...)` binds the model: Python refuses the call
        found.append(
            ir.error(
                ("inputs", "self"),
                "`self` cannot name an input: a model takes its inputs by name "
                "(`model(self=...)`), and Python gives `self` to the model itself",
                "rename the input (any other name works, `forward` and `to` included)",
                key=True,
            )
        )
    if len(spec.inputs) > 1:
        for _, data in ir.vertices("node"):
            if data["spec"].input is None:
                found.append(
                    ir.error(
                        (*data["path"], "kind"),
                        f"node `{data['name']}` must say which input it reads",
                        f"add `input:` with one of {', '.join(spec.inputs)} (or a list, or [] for none)",
                    )
                )
    for name, node in spec.nodes.items():
        perspective = getattr(node, "perspective", None)
        if (
            perspective is not None
            and perspective not in spec.perspectives
            and not ir.withheld.may_name("perspectives", perspective)
        ):
            guess = did_you_mean(perspective, spec.perspectives)
            found.append(
                ir.error(
                    ("nodes", name, "perspective"),
                    f"no perspective named `{perspective}`",
                    f"did you mean `{guess}`?"
                    if guess
                    else "declare it under `perspectives:` (e.g. `perspectives: {"
                    + perspective
                    + ": {kind: rotation}}`)",
                )
            )
    tokens_inputs = [n for n, i in spec.inputs.items() if i.kind == "tokens"]
    for name, out in spec.outputs.items():
        if out.kind != "lm_head":
            continue
        if out.vocab_of is not None and out.vocab_of not in tokens_inputs:
            guess = did_you_mean(out.vocab_of, tokens_inputs)
            found.append(
                ir.error(
                    ("outputs", name, "vocab_of"),
                    f"`vocab_of: {out.vocab_of}` must name a tokens input",
                    f"did you mean `{guess}`?"
                    if guess
                    else f"tokens inputs: {', '.join(tokens_inputs) or 'none'}",
                )
            )
        elif out.vocab_of is None and len(tokens_inputs) != 1:
            found.append(
                ir.error(
                    ("outputs", name, "kind"),
                    f"an `lm_head` needs {'a' if not tokens_inputs else 'one'} tokens input to take its vocabulary from",
                    "declare an input of `kind: tokens`"
                    if not tokens_inputs
                    else f"add `vocab_of:` with one of {', '.join(tokens_inputs)}",
                )
            )
    return found
