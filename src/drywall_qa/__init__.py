"""drywall-qa: text-prompted drywall defect segmentation with CLIPSeg."""

__version__ = "0.1.0"
