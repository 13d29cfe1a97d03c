"""Training methods, one module each (maths only). Adding a method = one file + one line here."""
from repbend.methods.base import METHODS, Method, Need, SeqBatch, States

METHODS.register("repbend", "repbend.methods.repbend:RepBend")
METHODS.register("circuit_breakers", "repbend.methods.circuit_breakers:CircuitBreakers")
METHODS.register("rmu", "repbend.methods.rmu:RMU")
METHODS.register("npo", "repbend.methods.npo:NPO")

__all__ = ["METHODS", "Method", "Need", "SeqBatch", "States"]
