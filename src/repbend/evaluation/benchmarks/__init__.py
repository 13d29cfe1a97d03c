"""Benchmark registry (lazy entries). A benchmark loads a versioned list of Behaviours."""
from repbend.evaluation.types import BENCHMARKS

BENCHMARKS.register("harmbench", "repbend.evaluation.benchmarks.packaged:HarmBench")
BENCHMARKS.register("harmbench_val", "repbend.evaluation.benchmarks.packaged:HarmBenchVal")
BENCHMARKS.register("jbb", "repbend.evaluation.benchmarks.packaged:JBBHarmful")
BENCHMARKS.register("strongreject", "repbend.evaluation.benchmarks.packaged:StrongReject")
BENCHMARKS.register("file", "repbend.evaluation.benchmarks.packaged:UserFile")

__all__ = ["BENCHMARKS"]
