"""Which student layer learns from which teacher layer.

Layers are numbered from 0 in each model's stack; "the output of layer i" is ``hidden_states[i + 1]`` (index 0 is the
embeddings). Maps are plain ``{student_layer: teacher_layer}`` dicts.
"""

from __future__ import annotations

from typing import Union

LayerMapSpec = Union[str, dict[int, int]]


def parse_layer_map(spec: LayerMapSpec) -> Union[str, dict[int, int]]:
    """Normalise a layer-map spec: ``"uniform"``, ``"last"``, a dict, or the command-line form ``"0:1,1:3,2:5"``."""
    if isinstance(spec, dict):
        return {int(student): int(teacher) for student, teacher in spec.items()}
    if spec in ("uniform", "last"):
        return spec
    try:
        pairs = [item.split(":") for item in spec.replace(" ", "").split(",") if item]
        mapping = {int(student): int(teacher) for student, teacher in pairs}
    except ValueError:
        mapping = None
    if not mapping:
        raise ValueError(
            f"Layer map {spec!r} is not 'uniform', 'last', or explicit 'student:teacher' pairs such as '0:1,1:3,2:5'."
        )
    return mapping


def resolve_layer_map(spec: LayerMapSpec, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """The explicit ``{student_layer: teacher_layer}`` map for models of the given depths, validated.

    * ``"uniform"``: student layer i matches teacher layer ⌈(i+1)·L_t/L_s⌉ − 1, so the last layers always meet
      (3 of 6: 0→1, 1→3, 2→5; 4 of 6: 0→1, 1→2, 2→4, 3→5).
    * ``"last"``: only the last layers, ``{L_s − 1: L_t − 1}``.
    * a dict: used as given.

    Raises:
        ValueError: a layer index outside either model's depth, naming the depth.
    """
    spec = parse_layer_map(spec)
    if spec == "uniform":
        # integer ceil of (i+1)*L_t/L_s, exact for any depths
        return {i: -(-(i + 1) * teacher_layers // student_layers) - 1 for i in range(student_layers)}
    if spec == "last":
        return {student_layers - 1: teacher_layers - 1}
    for student, teacher in spec.items():
        if not 0 <= student < student_layers:
            raise ValueError(
                f"Layer map {spec} uses student layer {student}, but the student has {student_layers} layers "
                f"(valid: 0..{student_layers - 1})."
            )
        if not 0 <= teacher < teacher_layers:
            raise ValueError(
                f"Layer map {spec} uses teacher layer {teacher}, but the teacher has {teacher_layers} layers "
                f"(valid: 0..{teacher_layers - 1})."
            )
    return dict(sorted(spec.items()))
