"""Proposal generators: the plain RPN and the Guided Anchoring RPN (their interface is
``models.interfaces.ProposalGenerator``)."""
from .ga_rpn import GARPN
from .rpn import RPN

__all__ = ["GARPN", "RPN"]
