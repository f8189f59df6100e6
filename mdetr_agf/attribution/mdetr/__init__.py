"""Attribution for MDETR: which rule sits on which module (``placement``), the rules MDETR's
transformer and text encoder need (``rules``), what the methods read (``capture``), what to
explain (``targets``) and the six methods (``methods``). ``mdetr_agf.explain`` is the door to them.
"""
from .methods import DEFAULT_SCORES, METHODS, Maps, Run
from .placement import agf_composite
from .targets import SCORES, AlignmentTarget, AnswerTarget, MaskTarget, QueryTokenTarget

__all__ = ["AlignmentTarget", "AnswerTarget", "DEFAULT_SCORES", "METHODS", "Maps", "MaskTarget", "QueryTokenTarget",
           "Run", "SCORES", "agf_composite"]
