"""Proposal generators: the plain RPN and the Guided Anchoring RPN (one interface, see ``base.ProposalGenerator``)."""
from .base import ProposalGenerator
from .ga_rpn import GARPN
from .rpn import RPN

__all__ = ["GARPN", "RPN", "ProposalGenerator"]
