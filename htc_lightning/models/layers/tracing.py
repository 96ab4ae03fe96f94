"""What exporting the inference graph (``torch.export``, ONNX) asks of the model code, in one place.

A traced graph must hold for every image size and every count of kept boxes, so the code must not branch on
a size it can only know when the graph runs (the boxes kept by a score threshold or an NMS) nor freeze a
traced image size into a Python int. The eager path is left as it is (its numbers are the reference); the
few places that differ when exporting compute the same numbers another way, each saying why.
"""
import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false


def exporting() -> bool:
    """True while ``torch.export`` traces the model (also under the ONNX exporter, which builds on it)."""
    return torch.compiler.is_exporting()


def known_empty(size) -> bool:
    """``size == 0`` where it can be decided; False for a count known only when the graph runs, so that the
    general path, which every caller makes handle zero rows, is traced."""
    return guard_or_false(size == 0)


def nms_keeps_zero_to_all() -> None:
    """Register the right fake kernel of ``torchvision::nms`` for tracing: it keeps from 0 to all of its boxes.
    torchvision's (0.29) declares at least 2 (``create_unbacked_symint``'s default minimum), which an exported
    graph then asserts at run time, failing on any class with fewer than 2 boxes kept."""

    def fake_nms(dets, scores, iou_threshold):
        torch._check(dets.dim() == 2 and dets.size(1) == 4, lambda: f"nms: boxes must be (N, 4), got {dets.shape}")
        torch._check(scores.dim() == 1 and scores.size(0) == dets.size(0),
                     lambda: f"nms: scores {scores.shape} do not match boxes {dets.shape}")
        num_kept = torch.library.get_ctx().new_dynamic_size(min=0)
        torch._check(num_kept <= dets.size(0))
        return dets.new_empty(num_kept, dtype=torch.long)

    torch.library.register_fake("torchvision::nms", fake_nms, allow_override=True)
