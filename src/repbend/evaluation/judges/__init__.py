"""Judge registry (lazy entries)."""
from repbend.evaluation.types import JUDGES

JUDGES.register("refusal", "repbend.evaluation.judges.refusal:RefusalJudge")
JUDGES.register("gibberish", "repbend.evaluation.judges.gibberish:GibberishJudge")
JUDGES.register("llm_classifier", "repbend.evaluation.judges.llm_classifier:LLMClassifierJudge")
JUDGES.register("default", "repbend.evaluation.judges.composite:DefaultJudge")

__all__ = ["JUDGES"]
