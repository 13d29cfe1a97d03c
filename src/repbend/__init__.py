"""repbend: representation bending for LLM safety.

The public Python API (each also has a CLI command):

- ``repbend.models.load_model`` / ``repbend.models.resolve_model``  (``repbend models``, ``repbend chat``)
- ``repbend.data.build.build_dataset``                             (``repbend data build``)
- ``repbend.training.train``                                       (``repbend train``)
- ``repbend.evaluation.evaluate``                                  (``repbend eval``)
- ``repbend.pipeline.demo`` / ``repbend.pipeline.compare``          (``repbend demo``, ``repbend compare``)
"""
__version__ = "0.1.0"
