"""Interop with the OpenAI Parameter Golf reference trainers' files (docs/spec.md §13).

    reference_files.py  read final_model.pt, final_model.int8.ptz, <run>_mlx_model.npz and
                        <run>_mlx_model.int8.ptz into our names, float32 weights and a spec
    export.py           our weights as the state dict train_gpt.py loads (final_model.pt), and the
                        size of the difference its RMSNorm epsilon makes
    conventions.py      where the scripts' models differ from ours: RoPE direction, epsilons, dtypes
    safe_pickle.py      the pickle reader for the MLX int8 artifact that runs nothing
    torch_files.py      torch.load(weights_only=True) / torch.save: the only torch in this layer
    bfloat16.py         bfloat16 as raw bits, for numpy
    pg_import.py, pg_export.py   `make pg-import` and `make pg-export`

A layer between data and trainer: core < data < interop < trainer < backends < bench < commands.
"""

from interop.reference_files import KINDS, ImportedModel, detect_kind, read_reference_file

__all__ = ["KINDS", "ImportedModel", "detect_kind", "read_reference_file"]
