"""Attack registry. Entries are lazy ("module:Class") so heavy attacks cost nothing until used."""
from repbend.evaluation.types import ATTACKS

# black-box (evaluation/attacks/blackbox.py)
ATTACKS.register("direct", "repbend.evaluation.attacks.blackbox:DirectRequest")
ATTACKS.register("prefill", "repbend.evaluation.attacks.blackbox:Prefill")
ATTACKS.register("templates", "repbend.evaluation.attacks.blackbox:Templates")
ATTACKS.register("obfuscation", "repbend.evaluation.attacks.blackbox:Obfuscation")
ATTACKS.register("system_prompt", "repbend.evaluation.attacks.blackbox:SystemPrompt")
ATTACKS.register("best_of_n", "repbend.evaluation.attacks.blackbox:BestOfN")
# white-box and adaptive
ATTACKS.register("embedding", "repbend.evaluation.attacks.embedding:EmbeddingAttack")
ATTACKS.register("gcg", "repbend.evaluation.attacks.gcg:GCGAttack")
ATTACKS.register("gcg_transfer", "repbend.evaluation.attacks.gcg:GCGTransfer")
ATTACKS.register("refusal_ablation", "repbend.evaluation.attacks.refusal_direction:RefusalAblation")
ATTACKS.register("steering", "repbend.evaluation.attacks.steering:Steering")
ATTACKS.register("relearn", "repbend.evaluation.attacks.relearn:Relearn")

__all__ = ["ATTACKS"]
