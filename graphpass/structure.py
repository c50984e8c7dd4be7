"""The structural checks every model meets at load and after every pass.

A file cut short at a message boundary parses without complaint, and a pass that loses a
definition leaves a model onnxruntime may refuse far from the cause: these checks name the
place instead. Each value is defined once per scope and before it is read, in every scope;
opset imports are unambiguous; IR 3 subgraphs declare their initializers as inputs; text fields
are UTF-8.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from graphpass.errors import InputError
from graphpass.scopes import Scope, build_scope_tree, subgraphs_of


def check_structure(proto: onnx.ModelProto, label: str = "model") -> None:
    """Every value read is defined before use, in every scope; raises InputError naming the gap.

    This catches files cut short at a message boundary, which protobuf parses without complaint,
    and is the post-condition every pass must keep.
    """
    problem = find_structure_problem(proto)
    if problem:
        raise InputError(f"{label}: {problem}")


def find_structure_problem(proto: onnx.ModelProto) -> str | None:
    problem = _opset_problem(proto) or _text_problem(proto)
    if problem:
        return problem
    scopes = build_scope_tree(proto)
    for scope in scopes:
        problem = _duplicate_definition(scope) or _undeclared_subgraph_initializer(scope, proto.ir_version)
        if problem:
            return problem
    for scope in scopes:
        if scope.parent is None:
            problem = _scope_problem(scope, set())
            if problem:
                return problem
    return None


# Free text no code reads: an exporter's stray bytes there do not stop a model onnxruntime runs.
_UNREAD_TEXT = frozenset({"doc_string", "producer_name", "producer_version", "metadata_props"})


def _text_problem(message, path: str = "model") -> str | None:
    """A text field (a name, a dim_param, an op type) that is not UTF-8: protobuf hands it
    back as bytes, which no code that reads names expects. A tensor's data is not walked
    (upb would copy it); its name and external-data keys are."""
    if isinstance(message, TensorProto):
        fields = [(message.DESCRIPTOR.fields_by_name["name"], message.name),
                  (message.DESCRIPTOR.fields_by_name["external_data"], message.external_data)]
    else:
        fields = [(field, value) for field, value in message.ListFields() if field.name not in _UNREAD_TEXT]
    for field, value in fields:
        repeated = _is_repeated(field)
        items = list(enumerate(value)) if repeated else [(None, value)]
        for index, item in items:
            where = f"{path}.{field.name}" + (f"[{index}]" if repeated else "")
            if field.type == field.TYPE_STRING and isinstance(item, bytes):
                return (f"{where} is not UTF-8 text ({item[:40]!r}); the file is damaged or was not written "
                        "by an ONNX exporter")
            if field.type == field.TYPE_MESSAGE:
                problem = _text_problem(item, where)
                if problem:
                    return problem
    return None


def _is_repeated(field) -> bool:
    # protobuf 7 has is_repeated and no label; earlier releases have label.
    found = getattr(field, "is_repeated", None)
    return found if found is not None else field.label == field.LABEL_REPEATED


def _opset_problem(proto: onnx.ModelProto) -> str | None:
    """Two entries for one domain leave the version ambiguous; onnxruntime takes the last."""
    versions: dict[str, list[int]] = {}
    for entry in proto.opset_import:
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        versions.setdefault(domain, []).append(entry.version)
    for domain, listed in versions.items():
        if len(listed) > 1:
            shown = "the default domain" if not domain else f"domain '{domain}'"
            return f"opset_import lists {shown} {len(listed)} times (versions {', '.join(map(str, listed))}); keep one"
    return None


def _duplicate_definition(scope: Scope) -> str | None:
    """Each value is defined once per scope (an initializer may also be a graph input)."""
    body = scope.body
    defined: set[str] = set(body.input) if scope.is_function else {v.name for v in body.input}
    if not scope.is_function:
        stored = [t.name for t in body.initializer] + [t.values.name for t in body.sparse_initializer]
        seen: set[str] = set()
        for name in stored:
            if name in seen:
                return f"initializer '{name}' is defined twice in {scope.path}"
            seen.add(name)
        defined |= seen
    for node in body.node:
        for name in node.output:
            if name and name in defined:
                return f"'{name}' is defined twice in {scope.path} (again by node '{node.name or node.op_type}')"
            defined.add(name)
    return None


def _undeclared_subgraph_initializer(scope: Scope, ir_version: int) -> str | None:
    """Before IR version 4 every initializer must also be an input; onnxruntime enforces it in
    subgraphs (whose inputs are fixed by If, Loop and Scan, so new tensors there are Constant
    nodes)."""
    if ir_version >= 4 or scope.parent is None or scope.is_function:
        return None
    inputs = {v.name for v in scope.body.input}
    for tensor in scope.body.initializer:
        if tensor.name not in inputs:
            return (f"initializer '{tensor.name}' in {scope.path} is not a subgraph input, "
                    f"which IR version {ir_version} (< 4) requires")
    return None


def _scope_problem(scope: Scope, visible: set[str]) -> str | None:
    body = scope.body
    defined = set(visible)
    if scope.is_function:
        defined.update(body.input)
    else:
        defined.update(v.name for v in body.input)
        defined.update(t.name for t in body.initializer)
        defined.update(t.values.name for t in body.sparse_initializer)
    for node in body.node:
        for name in node.input:
            if name and name not in defined:
                return f"node '{node.name or node.op_type}' in {scope.path} reads '{name}', which nothing defines before it"
        for _, graph in subgraphs_of(node):
            child = next(c for c in scope.children if c.body is graph)
            problem = _scope_problem(child, defined)
            if problem:
                return problem
        defined.update(o for o in node.output if o)
    for name in scope.output_names():
        if name not in defined:
            return f"output '{name}' of {scope.path} is never computed"
    return None
