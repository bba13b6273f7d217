"""``region_proposal``: SD-RPN's self-distilled region proposals, and the training-free attention crop."""

from vtoken_plugins.region_proposal.config import RegionProposalConfig
from vtoken_plugins.region_proposal.plugin import RegionProposal

__all__ = ["RegionProposal", "RegionProposalConfig"]
